//! Every state change of a target's transactions (DESIGN §2 "One owner per target"): apply,
//! confirm, extend, rollback on request, SIGUSR1, probe rounds, stop and recovery. Each takes
//! the target owner's `op` lock for its whole run; `apply` first claims the target atomically,
//! before anything is read, so a second apply gets exit 4 naming the first.
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::engine::{ApplyInput, Undo};
use super::proof;
use super::protocol::{ApplyRequest, Response, MAX_EXTEND_SECS, VERSION};
use super::rollback::{arm_timer, finish, roll_back, schedule_idle_check};
use super::state::{Busy, Owner, Phase, Shared};
use super::steps::*;
use super::worker::Worker;
use crate::exit::Exit;
use crate::journal;
use crate::lint::SshConn;
use crate::model::names::Tag;
use crate::netns::unpin;
use crate::probe::Probe;
use crate::txn::{self, Deadline, Kind, Reason, Recovery, Requester, State, TargetRecord, TxnId, TxnRecord};

/// How many times an apply re-reads and re-plans after a foreign change between its read and
/// its commit before it gives up (exit 3).
pub const CONFLICT_RETRIES: u32 = 3;

fn busy(b: &Busy) -> Response {
    let left = b.seconds_left.map(|s| format!(", {s} s left")).unwrap_or_default();
    Response {
        v: VERSION,
        exit: Exit::Busy.code(),
        error: Some(format!("transaction {} is {} on this target{left}", b.txid, b.phase.name())),
        data: json!({"pending": b.txid, "phase": b.phase.name(), "seconds_left": b.seconds_left}),
    }
}

/// True when an engine error says a foreign change raced the commit and nothing was applied
/// (re-read and re-plan may succeed).
fn retryable(e: &super::engine::EngineError) -> bool {
    e.retry
}

/// `apply`: validation, claim, pin, prepare → PREPARED → apply → rollback check → PENDING →
/// timer, then the first probe round. Every failure after the claim ends in a terminal
/// journal state (or a loudly wedged target) with the pin removed.
pub async fn apply(shared: &Arc<Shared>, a: ApplyRequest, peer_pid: Option<i32>, peer_uid: u32) -> Response {
    let r = apply_inner(shared, a, peer_pid, peer_uid).await;
    // What prepare read and planned is freed by now: give it back to the system, so a pending
    // transaction holds only its (compressed) record (once the answer is written).
    super::state::release_memory_after_answer();
    r
}

async fn apply_inner(shared: &Arc<Shared>, a: ApplyRequest, peer_pid: Option<i32>, peer_uid: u32) -> Response {
    let mut policy = match load_policy(&a) {
        Ok(p) => p,
        Err(r) => return r,
    };
    if a.options.remove && (a.policy_text.is_some() || a.ruleset.is_some()) {
        return Response::fail(Exit::BadInput, "--remove takes no policy or ruleset");
    }
    if a.timeout_secs == 0 || Duration::from_secs(a.timeout_secs) > crate::duration::MAX_DURATION {
        return Response::fail(Exit::BadInput, "timeout: must be between 1 s and 7 days");
    }
    let probes = match a.options.probes.iter().map(|p| Probe::parse(p)).collect::<Result<Vec<_>, _>>() {
        Ok(p) => p,
        Err(e) => return Response::fail(Exit::BadInput, format!("--probe: {e}")),
    };
    if a.options.auto_confirm && probes.is_empty() {
        return Response::fail(Exit::BadInput, "--auto-confirm needs at least one --probe");
    }
    if a.options.probe_interval_secs == Some(0) {
        return Response::fail(Exit::BadInput, "--probe-interval: must be positive");
    }
    // Who asks, over which SSH connection (DESIGN §4). A requester under sshd whose connection
    // cannot be identified is refused, never taken for a local shell.
    let origin = if a.options.allow_same_connection {
        None
    } else {
        match peer_pid.map(proof::origin_of) {
            Some(Ok(o)) => Some(o),
            Some(Err(e)) => {
                return Response::fail(
                    Exit::BadInput,
                    format!("cannot identify your SSH connection ({e}); retry, or pass --allow-same-connection"),
                )
            }
            None => return Response::fail(Exit::BadInput, "cannot identify the requester (no peer pid)"),
        }
    };
    let rt = match resolve_target(a.netns.as_deref(), peer_pid) {
        Ok(t) => t,
        Err(r) => return r,
    };
    if let Some(want) = a.netns_id.filter(|w| *w != rt.target.id) {
        return Response::fail(
            Exit::BadInput,
            format!(
                "--netns {}: names namespace {}:{} for the CLI but {}:{} for the agent; refused",
                rt.label, want.0, want.1, rt.target.id.0, rt.target.id.1
            ),
        );
    }
    // Persistence describes the host's boot: a namespace has none. (A policy file saying
    // `persist = true` applied to a namespace — `ctguard restore` re-applying the saved one —
    // is applied, and its commit reports that nothing was persisted.)
    if a.options.persist && !rt.target.is_initial() {
        return Response::fail(Exit::BadInput, "--persist: only the host's own namespace boots from /etc");
    }
    let id = rt.target.id;
    if a.options.remove {
        policy = match removal_policy(shared, id) {
            Ok(p) => p,
            Err(r) => return r,
        };
    }
    let txid = match shared.journal.fresh_id(now_wall()) {
        Ok(id) => id,
        Err(e) => return Response::fail(Exit::Internal, e.to_string()),
    };
    let tag = match Tag::new(txid.as_str()) {
        Ok(t) => t,
        Err(e) => return Response::fail(Exit::Internal, e),
    };
    let kind = if a.ruleset.is_some() { Kind::Ruleset } else { Kind::Policy };
    let pin = shared.opts.run_dir.join("ns").join(txid.as_str());
    let target_rec = TargetRecord { label: rt.label.clone(), path: rt.path.clone(), pin: None, dev: id.0, ino: id.1 };
    let ssh = origin.as_ref().and_then(|o| o.conn().map(|c| c.to_env_value())).or_else(|| a.ssh.clone());
    if let Some(c) = &a.comment {
        if let Err(e) = super::protocol::check_comment(c) {
            return Response::fail(Exit::BadInput, e);
        }
    }
    let person = peer_pid.and_then(person_of);
    let requester = Requester { uid: peer_uid, pid: peer_pid.unwrap_or(0), ssh, origin: origin.clone(), person };
    let mut rec = TxnRecord::new(txid.clone(), kind, target_rec, requester, shared.boot_id.clone(), now_wall());
    match &a.ruleset {
        Some(r) => rec.ruleset = Some(r.text.clone()),
        None => rec.policy = serde_json::to_value(&policy).ok(),
    }
    rec.tools = journaled_tools();
    rec.options = a.options.clone();
    rec.comment = match (&a.comment, &a.from) {
        (Some(c), _) => Some(c.clone()),
        (None, Some(f)) => Some(format!("re-applies what {f} committed")),
        (None, None) if a.options.remove => Some("removes ctguard from the target".into()),
        (None, None) => None,
    };
    // One unfinished transaction per target, decided before anything is read. The guard's own
    // repair of a committed policy is short and internal: wait for it instead of refusing.
    let mut waited = 0;
    let owner = loop {
        match shared.claim(id, rec.clone()) {
            Ok(o) => break o,
            Err(b) if b.phase == Phase::Repairing && waited < 3 => {
                waited += 1;
                let o = shared.owner(id);
                drop(o.op.lock().await);
            }
            Err(b) => return busy(&b),
        }
    };
    let _op = owner.op.lock().await;
    let claimed = Claim { shared, owner: &owner, txid: txid.as_str(), pin: None };
    if let Err(e) = shared.journal.check_room() {
        return claimed.abandon(Response::fail(Exit::BadInput, format!("state dir: {e}")));
    }
    if let Err(e) = rt.target.pin(&pin) {
        return claimed.abandon(Response::fail(Exit::BadInput, format!("cannot pin the target namespace: {e}")));
    }
    let claimed = Claim { pin: Some(&pin), ..claimed };
    rec.target.pin = Some(pin.display().to_string());
    owner.set_record(&rec);
    fault("apply:after-pin");
    let worker = match shared.worker(rt.target) {
        Ok(w) => w,
        Err(e) => return claimed.abandon(Response::fail(Exit::Internal, format!("cannot enter the target: {e}"))),
    };
    if a.options.auto_confirm {
        let p2 = probes.clone();
        let local = worker
            .call(move || {
                p2.iter().filter(|p| crate::probe::aims_at_local_address(p)).map(|p| p.to_string()).collect::<Vec<_>>()
            })
            .await;
        match local {
            Ok(l) if l.is_empty() => {}
            Ok(l) => {
                return claimed.abandon(Response::fail(
                    Exit::BadInput,
                    format!(
                        "--auto-confirm: {} aim(s) at the target's own addresses; over loopback they prove nothing",
                        l.join(", ")
                    ),
                ))
            }
            Err(e) => return claimed.abandon(Response::fail(Exit::Internal, e.to_string())),
        }
    }
    let previous_undo = match last_committed(shared, id).filter(|_| kind == Kind::Policy) {
        Some(r) => match Undo::from_record(Kind::Policy, &r.undo) {
            Ok(u) => Some(u),
            Err(e) => {
                let msg = format!("the committed transaction {} this one would replace: {}", r.id, e.message);
                return claimed.abandon(Response::fail(e.exit, msg));
            }
        },
        None => None,
    };
    let input = ApplyInput {
        policy: policy.clone(),
        ruleset: a.ruleset.clone(),
        tag,
        force: a.force,
        ssh: origin
            .as_ref()
            .and_then(|o| o.conn().map(|c| c.lint_conn()))
            .or_else(|| a.ssh.as_deref().and_then(SshConn::from_env_value)),
        previous_undo,
        facts: ram_facts(),
    };
    // Prepare → PREPARED → apply, again after a foreign change raced the commit (bounded).
    let mut attempt = 0;
    let (undo, warnings, after) = loop {
        attempt += 1;
        let engine = shared.engines.of(kind);
        let inp = input.clone();
        let prepared = match worker.call(move || engine.prepare(&inp)).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => return claimed.abandon(Response::fail(e.exit, e.message)),
            Err(e) => return claimed.abandon(Response::fail(Exit::Internal, e.to_string())),
        };
        let warnings = prepared.warnings();
        rec.before = Some(prepared.before());
        let planned = prepared.planned_undo();
        rec.undo = planned.to_value();
        rec.genid_before = planned.genid_before();
        owner.set_record(&rec);
        if attempt == 1 {
            // Room for the later records of this transaction, whatever fills the disk meanwhile.
            let size = rec.to_json().map(|b| b.len() as u64).unwrap_or(0);
            if let Err(e) = shared.journal.reserve(&rec.id, size.saturating_mul(2) + (64 << 10)) {
                return claimed.abandon(Response::fail(Exit::BadInput, format!("state dir: {e}")));
            }
        }
        if let Err(e) = write_record(shared, Some(&owner), &rec) {
            return claimed.abandon(Response::fail(Exit::BadInput, format!("journal: {e}")));
        }
        fault("apply:after-prepared");
        fault_fill_disk(shared.journal.txn_dir());
        // The change. From here on, every failure rolls back.
        match worker.call(move || prepared.apply_listed()).await {
            Ok(Ok((u, after))) => break (u, warnings, after),
            Ok(Err(e)) if retryable(&e) && attempt < CONFLICT_RETRIES => {
                tracing::warn!(txid = txid.as_str(), "attempt {attempt}: {}; re-reading and re-planning", e.message);
                rec.note(now_wall(), format!("attempt {attempt} refused: {}; re-planned", e.message));
                continue;
            }
            Ok(Err(e)) => {
                let msg = if retryable(&e) {
                    format!(
                        "{} (gave up after {attempt} attempts: the ruleset keeps changing under ctguard)",
                        e.message
                    )
                } else {
                    e.message
                };
                return fail_and_roll_back(shared, &owner, rec, e.exit, msg).await;
            }
            Err(e) => return fail_and_roll_back(shared, &owner, rec, Exit::Internal, e.to_string()).await,
        }
    };
    fault("apply:after-apply");
    rec.undo = undo.to_value();
    rec.genid_after = undo.genid_after();
    owner.set_record(&rec);
    let engine = shared.engines.of(kind);
    let undo2 = undo.clone();
    match worker.call(move || engine.check_rollback(&undo2)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let msg = format!("the rollback does not pass the kernel check, so the change is undone: {e}");
            return fail_and_roll_back(shared, &owner, rec, Exit::Refused, msg).await;
        }
        Err(e) => return fail_and_roll_back(shared, &owner, rec, Exit::Internal, e.to_string()).await,
    }
    rec.after = match after {
        Some(a) => Some(a),
        None => {
            let engine = shared.engines.of(kind);
            let undo3 = undo.clone();
            worker.call(move || engine.listing(&undo3)).await.ok().and_then(Result::ok)
        }
    };
    let now_bt = journal::boottime_ns();
    let deadline_bt = now_bt + a.timeout_secs * 1_000_000_000;
    let deadline =
        Deadline { boottime_ns: deadline_bt, boot_id: shared.boot_id.clone(), wall_unix: now_wall() + a.timeout_secs };
    if let Err(e) = rec.to_pending(deadline, now_wall()) {
        return fail_and_roll_back(shared, &owner, rec, Exit::Internal, e.to_string()).await;
    }
    if let Err(e) = write_record(shared, Some(&owner), &rec) {
        return fail_and_roll_back(shared, &owner, rec, Exit::Internal, format!("journal: {e}")).await;
    }
    fault("apply:after-pending");
    owner.set_record(&rec);
    owner.update(txid.as_str(), |c| c.phase = Phase::Pending);
    arm_timer(shared, &owner, txid.as_str(), deadline_bt);
    tracing::info!(txid = txid.as_str(), target = %rt.label, "applied; pending for {} s", a.timeout_secs);
    // The command that confirms: from a new connection when the proof applies.
    let confirm_cmd = confirm_command(shared, origin.as_ref().and_then(|o| o.conn()), txid.as_str());
    let mut probe_results = Value::Null;
    let mut state = "PENDING";
    // A ruleset that changed no listing is committed at once (DESIGN §8): nothing to guard.
    let noop = kind == Kind::Ruleset && rec.before.is_some() && rec.before == rec.after;
    if noop {
        let r =
            commit(shared, &owner, txid.as_str(), "no-op: applying the ruleset changed no listing; committed at once");
        if r.exit != 0 {
            return r;
        }
        state = "COMMITTED";
    } else if !probes.is_empty() {
        // The first round: apply answers only after it (exit 5 if it rolled back).
        let results = run_probes(&worker, probes.clone()).await;
        probe_results = json!(results);
        let failed = failed_probes(&results);
        if !failed.is_empty() {
            let detail = failed.join("; ");
            return match roll_back(shared, &owner, txid.as_str(), Reason::ProbeFailed(detail.clone())).await {
                Ok(()) => Response {
                    v: VERSION,
                    exit: Exit::RolledBack.code(),
                    error: Some(format!("probe failed, rolled back: {detail}")),
                    data: json!({"txid": txid.as_str(), "probes": probe_results}),
                },
                Err(e) => Response::fail(
                    Exit::RollbackFailed,
                    format!("probe failed ({detail}); then the rollback failed: {e}"),
                ),
            };
        }
        rec.note(now_wall(), format!("first probe round passed ({} probes)", results.len()));
        owner.set_record(&rec);
        let _ = write_record(shared, Some(&owner), &rec);
        if a.options.auto_confirm {
            let r = commit(shared, &owner, txid.as_str(), "auto-confirmed: every probe passed");
            if r.exit != 0 {
                return r;
            }
            state = "COMMITTED";
        } else if let Some(every) = a.options.probe_interval_secs {
            spawn_probe_rounds(shared.clone(), owner.clone(), worker.clone(), txid.clone(), probes, every);
        }
    }
    Response::ok(json!({
        "state": state,
        "noop": noop,
        "probes": probe_results,
        "needs_new_connection": origin.as_ref().is_some_and(|o| o.conn().is_some()),
        "txid": txid.as_str(),
        "target": rt.label,
        "deadline": txn::format_rfc3339(now_wall() + a.timeout_secs),
        "seconds_left": a.timeout_secs,
        "confirm": confirm_cmd,
        "warnings": warnings,
    }))
}

/// A claimed target before anything was applied: giving up releases it and removes the pin
/// and the record's reserve (nothing was journaled that needs undoing: a PREPARED record
/// written before the failure is closed as rolled back, its apply never ran).
struct Claim<'a> {
    shared: &'a Arc<Shared>,
    owner: &'a Arc<Owner>,
    txid: &'a str,
    pin: Option<&'a Path>,
}

impl Claim<'_> {
    fn abandon(self, r: Response) -> Response {
        if let Some(mut rec) = self.owner.record(self.txid) {
            // A PREPARED record may already be on disk (a failed re-plan): close it.
            if self.shared.journal.record_path(&rec.id).exists() {
                let why = r.error.clone().unwrap_or_default();
                let _ = rec.to_rolled_back(Reason::ApplyFailed(why), now_wall());
                let _ = write_record(self.shared, None, &rec);
            }
            self.shared.journal.release_reserve(&rec.id);
        }
        if let Some(p) = self.pin {
            unpin(p);
        }
        self.owner.release(self.txid);
        schedule_idle_check(self.shared);
        r
    }
}

/// What `apply --remove` applies on target `id` ([`crate::persist::removal_policy`]).
fn removal_policy(shared: &Shared, id: (u64, u64)) -> Result<crate::model::Policy, Response> {
    let all = shared.journal.list().map_err(|e| Response::fail(Exit::Internal, e.to_string()))?;
    crate::persist::removal_policy(&all, id).map_err(|e| Response::fail(Exit::BadInput, e))
}

/// The latest COMMITTED policy transaction on a target (the one a new apply replaces).
fn last_committed(shared: &Shared, id: (u64, u64)) -> Option<TxnRecord> {
    let all = shared.journal.list().ok()?;
    all.into_iter()
        .rev()
        .find(|r| (r.target.dev, r.target.ino) == id && r.kind == Kind::Policy)
        .filter(|r| r.state == State::Committed)
}

async fn fail_and_roll_back(
    shared: &Arc<Shared>,
    owner: &Arc<Owner>,
    rec: TxnRecord,
    exit: Exit,
    msg: String,
) -> Response {
    tracing::error!(txid = rec.id.as_str(), "{msg}; rolling back");
    let txid = rec.id.as_str().to_string();
    owner.set_record(&rec);
    drop(rec);
    match roll_back(shared, owner, &txid, Reason::ApplyFailed(msg.clone())).await {
        Ok(()) => Response::fail(exit, format!("{msg} (rolled back)")),
        Err(e) => Response::fail(Exit::RollbackFailed, format!("{msg}; then the rollback failed: {e}")),
    }
}

/// `--probe-interval`: repeats the probes while the transaction is pending; any failure rolls
/// back at once. Each round runs under the owner.
fn spawn_probe_rounds(
    shared: Arc<Shared>,
    owner: Arc<Owner>,
    worker: Worker,
    txid: TxnId,
    probes: Vec<Probe>,
    every_secs: u64,
) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(every_secs)).await;
            let _op = owner.op.lock().await;
            if !matches!(owner.current(), Some((id, Phase::Pending)) if id == txid.as_str()) {
                return;
            }
            let failed = failed_probes(&run_probes(&worker, probes.clone()).await);
            if !failed.is_empty() {
                tracing::warn!(txid = txid.as_str(), "probe failed: {}; rolling back", failed.join("; "));
                let _ = roll_back(&shared, &owner, txid.as_str(), Reason::ProbeFailed(failed.join("; "))).await;
                return;
            }
        }
    });
}

/// What a confirm/extend/rollback names: the owner holding `txid`, or the single unfinished
/// transaction (of `netns` when given). `Err` carries the answer when there is nothing to do
/// in memory (unknown id, or a record that already ended).
enum Picked {
    Live(Arc<Owner>, String),
    Ended(Box<TxnRecord>),
}

fn pick(shared: &Shared, txid: Option<&str>, netns: Option<&str>, peer_pid: Option<i32>) -> Result<Picked, Response> {
    if let Some(t) = txid {
        let id = TxnId::parse(t).map_err(|e| Response::fail(Exit::BadInput, e.to_string()))?;
        if let Some(o) = shared.owner_of(id.as_str()) {
            return Ok(Picked::Live(o, id.as_str().to_string()));
        }
        return match shared.journal.load(&id) {
            Ok(rec) => Ok(Picked::Ended(Box::new(rec))),
            Err(e) => Err(Response::fail(Exit::BadInput, e.to_string())),
        };
    }
    let mut live = shared.busy_owners();
    if let Some(n) = netns {
        let rt = resolve_target(Some(n), peer_pid)?;
        live.retain(|o| o.id == rt.target.id);
    }
    match live.len() {
        0 => Err(Response::fail(
            Exit::BadInput,
            match netns {
                Some(n) => format!("no transaction is pending on {n}"),
                None => "no transaction is pending".to_string(),
            },
        )),
        1 => {
            let o = live.remove(0);
            let id = o.current().map(|(id, _)| id).unwrap_or_default();
            Ok(Picked::Live(o, id))
        }
        n => Err(Response::fail(Exit::BadInput, format!("{n} transactions are pending; name one (or use --netns)"))),
    }
}

/// The answer for a transaction that is no longer (or not yet) pending.
fn not_pending(rec: &TxnRecord, verb: &str) -> Response {
    match &rec.state {
        State::Committed if verb == "confirm" => {
            Response::ok(json!({"txid": rec.id.as_str(), "state": "COMMITTED", "note": "already committed"}))
        }
        State::RolledBack { reason } if verb == "rollback" => Response::ok(
            json!({"txid": rec.id.as_str(), "state": "ROLLED_BACK", "note": format!("already rolled back ({reason})")}),
        ),
        State::RolledBack { reason } => {
            Response::fail(Exit::RolledBack, format!("transaction {} was already rolled back ({reason})", rec.id))
        }
        State::RollbackFailed { .. } => {
            Response::fail(Exit::RollbackFailed, format!("transaction {}: rollback failed; state unknown", rec.id))
        }
        State::Committed => Response::fail(
            Exit::BadInput,
            format!("transaction {} is committed; apply a new policy to change it", rec.id),
        ),
        s => Response::fail(Exit::BadInput, format!("transaction {} is {}, not pending", rec.id, s.name())),
    }
}

/// Re-reads the outcome of `txid` after waiting for its owner: in memory if still there, else
/// the journal.
fn ended_record(shared: &Shared, owner: &Owner, txid: &str) -> Option<TxnRecord> {
    owner.head(txid).or_else(|| TxnId::parse(txid).ok().and_then(|id| shared.journal.load(&id).ok()))
}

/// `confirm`: commits when the transaction is still pending once the owner is ours; a confirm
/// that waited for a rollback gets exit 5. Journaled before the answer.
pub async fn confirm(shared: &Arc<Shared>, txid: Option<&str>, netns: Option<&str>, peer_pid: Option<i32>) -> Response {
    let (owner, txid) = match pick(shared, txid, netns, peer_pid) {
        Ok(Picked::Live(o, t)) => (o, t),
        Ok(Picked::Ended(rec)) => return not_pending(&rec, "confirm"),
        Err(r) => return r,
    };
    let _op = owner.op.lock().await;
    let phase = owner.current().filter(|(id, _)| *id == txid).map(|(_, p)| p);
    match phase {
        Some(Phase::Pending) => {}
        Some(p @ (Phase::RollbackOwed { .. } | Phase::Wedged { .. })) => {
            return Response::fail(
                Exit::RollbackFailed,
                format!("transaction {txid} is being rolled back ({}); it cannot be confirmed", p.name()),
            )
        }
        Some(p) => return Response::fail(Exit::BadInput, format!("transaction {txid} is {}", p.name())),
        None => {
            return match ended_record(shared, &owner, &txid) {
                Some(rec) => not_pending(&rec, "confirm"),
                None => Response::fail(Exit::BadInput, format!("no transaction {txid}")),
            }
        }
    }
    let Some(rec) = owner.record(&txid) else { return Response::fail(Exit::Internal, "record vanished") };
    // The proof of a new connection (DESIGN §4).
    let mut note = "confirmed".to_string();
    if !rec.options.allow_same_connection {
        let confirming = match peer_pid.map(proof::origin_of) {
            Some(Ok(o)) => o,
            // Journaled like every other refusal, with what it rested on.
            unidentified => {
                let why = match unidentified {
                    Some(Err(e)) => format!("cannot identify its SSH connection ({e})"),
                    _ => "the sender is gone".to_string(),
                };
                let mut r = rec.clone();
                let who = peer_pid.map_or_else(|| "an unknown sender".to_string(), |p| format!("pid {p}"));
                r.note(now_wall(), format!("confirm refused from {who}: {why}"));
                owner.set_record(&r);
                let _ = write_record(shared, Some(&owner), &r);
                return Response::fail(Exit::ConfirmRefused, format!("confirm refused: {why}"));
            }
        };
        note = format!("confirmed from {confirming}");
        if let Some(applied) = &rec.requester.origin {
            // The target's own addresses, read in its namespace: `ssh` to them is loopback.
            let mut local = Vec::new();
            if applied.over_ssh() && confirming.verified_conn().is_some() {
                match worker_for_record(shared, &rec) {
                    Ok(w) => local = w.call(proof::local_addresses).await.unwrap_or_default(),
                    Err(e) => tracing::warn!(txid = rec.id.as_str(), "the target's addresses: {e}"),
                }
            }
            match proof::decide_confirm(applied, &confirming, &local) {
                Ok(accepted) => note = format!("confirmed from {confirming}: {accepted}"),
                Err(refusal) => {
                    let mut r = rec.clone();
                    r.note(now_wall(), format!("confirm refused from {confirming}: {}", refusal.why()));
                    owner.set_record(&r);
                    let _ = write_record(shared, Some(&owner), &r);
                    return Response::fail(
                        Exit::ConfirmRefused,
                        format!(
                            "confirm refused: {}; confirm from a NEW connection: {}",
                            refusal.why(),
                            confirm_command(shared, Some(&refusal.conn), rec.id.as_str())
                        ),
                    );
                }
            }
        }
    }
    commit(shared, &owner, &txid, &note)
}

/// PENDING → COMMITTED (caller holds `owner.op`): journal first — the timer stays armed until
/// the record is written — then persist when asked, unpin, free the target.
fn commit(shared: &Arc<Shared>, owner: &Arc<Owner>, txid: &str, note: &str) -> Response {
    let Some(mut rec) = owner.record(txid) else { return Response::fail(Exit::Internal, "record vanished") };
    fault("confirm:before-journal");
    rec.note(now_wall(), note);
    if let Err(e) = rec.to_committed(now_wall()) {
        return Response::fail(Exit::Internal, e.to_string());
    }
    if let Err(e) = write_record(shared, Some(owner), &rec) {
        // Not journaled: the dead-man timer stays armed (safety first).
        return Response::fail(Exit::Internal, format!("journal: {e}; not committed, the deadline still applies"));
    }
    fault("confirm:after-journal");
    // Committed: the timer goes with the transaction.
    let held = super::state::HeldRecord::pack(rec.clone());
    owner.update(txid, |c| {
        if let Some(t) = c.timer.take() {
            t.abort();
        }
        c.rec = held;
    });
    let mut persist_note = Value::Null;
    if crate::persist::wants_persist(&rec) {
        let paths = crate::persist::PersistPaths::detect(Path::new("/"), shared.journal.state_dir());
        match crate::persist::on_committed(&rec, &paths) {
            Ok(Some(written)) => {
                persist_note = serde_json::to_value(&written).unwrap_or(Value::Null);
                if let Some(u) = rec.undo.as_object_mut() {
                    u.insert("persisted".into(), persist_note.clone());
                }
                let _ = write_record(shared, None, &rec);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(txid, "committed, but persisting failed: {e}");
                persist_note = json!({"error": e.to_string()});
            }
        }
    }
    finish(shared, owner, &rec);
    // Committed means kept: a policy is guarded from now on; a committed ruleset replaced the
    // whole firewall on purpose, so nothing earlier is guarded any more.
    match rec.kind {
        Kind::Policy => super::guard::start(shared, owner, rec.clone()),
        Kind::Ruleset => owner.stop_guard(),
    }
    tracing::info!(txid, "{note}");
    drop(rec);
    super::state::release_memory_after_answer();
    Response::ok(json!({"txid": txid, "state": "COMMITTED", "persisted": persist_note}))
}

/// `extend --by`: a later deadline (at most [`MAX_EXTEND_SECS`] from now), journaled, then
/// the timer re-armed. An extend that waited for a rollback gets exit 5.
pub async fn extend(
    shared: &Arc<Shared>,
    txid: Option<&str>,
    netns: Option<&str>,
    by_secs: u64,
    peer_pid: Option<i32>,
) -> Response {
    if by_secs == 0 || by_secs > MAX_EXTEND_SECS {
        return Response::fail(Exit::BadInput, format!("--by: must be between 1 s and {MAX_EXTEND_SECS} s (7 days)"));
    }
    let (owner, txid) = match pick(shared, txid, netns, peer_pid) {
        Ok(Picked::Live(o, t)) => (o, t),
        Ok(Picked::Ended(rec)) => return not_pending(&rec, "extend"),
        Err(r) => return r,
    };
    let _op = owner.op.lock().await;
    match owner.current().filter(|(id, _)| *id == txid).map(|(_, p)| p) {
        Some(Phase::Pending) => {}
        Some(p) => return Response::fail(Exit::BadInput, format!("transaction {txid} is {}, not pending", p.name())),
        None => {
            return match ended_record(shared, &owner, &txid) {
                Some(rec) => not_pending(&rec, "extend"),
                None => Response::fail(Exit::BadInput, format!("no transaction {txid}")),
            }
        }
    }
    let Some(mut rec) = owner.record(&txid) else { return Response::fail(Exit::Internal, "record vanished") };
    let Some(old) = rec.deadline.clone() else { return Response::fail(Exit::Internal, "pending without a deadline") };
    let now_bt = journal::boottime_ns();
    let Some(new_bt) = by_secs.checked_mul(1_000_000_000).and_then(|n| old.boottime_ns.checked_add(n)) else {
        return Response::fail(Exit::BadInput, "--by: too large");
    };
    if new_bt.saturating_sub(now_bt) > MAX_EXTEND_SECS * 1_000_000_000 {
        return Response::fail(
            Exit::BadInput,
            format!("--by: the deadline would be more than {MAX_EXTEND_SECS} s (7 days) from now"),
        );
    }
    let new = Deadline {
        boottime_ns: new_bt,
        boot_id: old.boot_id.clone(),
        wall_unix: old.wall_unix.saturating_add(by_secs),
    };
    if let Err(e) = rec.extend(new.clone(), now_wall()) {
        return Response::fail(Exit::BadInput, e.to_string());
    }
    if let Err(e) = write_record(shared, Some(&owner), &rec) {
        return Response::fail(Exit::Internal, format!("journal: {e}; the old deadline still applies"));
    }
    owner.set_record(&rec);
    arm_timer(shared, &owner, &txid, new.boottime_ns);
    let left = rec.seconds_left(journal::boottime_ns()).unwrap_or(0);
    Response::ok(json!({"txid": txid, "deadline": txn::format_rfc3339(new.wall_unix), "seconds_left": left}))
}

/// `rollback`: now, waiting for the result.
pub async fn rollback_request(
    shared: &Arc<Shared>,
    txid: Option<&str>,
    netns: Option<&str>,
    peer_pid: Option<i32>,
) -> Response {
    let (owner, txid) = match pick(shared, txid, netns, peer_pid) {
        Ok(Picked::Live(o, t)) => (o, t),
        Ok(Picked::Ended(rec)) => return not_pending(&rec, "rollback"),
        Err(r) => return r,
    };
    let _op = owner.op.lock().await;
    let reason = match owner.current().filter(|(id, _)| *id == txid).map(|(_, p)| p) {
        Some(Phase::Pending) => Reason::Cancelled,
        Some(Phase::RollbackOwed { reason, .. }) => reason,
        Some(p) => return Response::fail(Exit::Busy, format!("transaction {txid} is {}", p.name())),
        None => {
            return match ended_record(shared, &owner, &txid) {
                Some(rec) => not_pending(&rec, "rollback"),
                None => Response::fail(Exit::BadInput, format!("no transaction {txid}")),
            }
        }
    };
    match roll_back(shared, &owner, &txid, reason).await {
        Ok(()) => Response::ok(json!({"txid": txid, "state": "ROLLED_BACK"})),
        Err(e) => Response::fail(Exit::RollbackFailed, format!("rollback of {txid} failed: {e}")),
    }
}

/// SIGUSR1: confirms the single pending transaction with the sender put through the proof.
pub async fn confirm_by_signal(shared: &Arc<Shared>, pid: Option<i32>) {
    let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
    if !alive {
        tracing::warn!("SIGUSR1 from a sender that is gone ({pid:?}): refused");
        return;
    }
    let r = confirm(shared, None, None, pid).await;
    match r.error {
        None => tracing::info!("SIGUSR1 from pid {pid:?} confirmed the pending transaction"),
        Some(e) => tracing::warn!("SIGUSR1 from pid {pid:?} refused: {e}"),
    }
}

/// SIGTERM/SIGINT: roll back everything unfinished before exit.
pub async fn stop_all(shared: &Arc<Shared>) {
    for owner in shared.busy_owners() {
        let _op = owner.op.lock().await;
        let Some((txid, phase)) = owner.current() else { continue };
        let reason = match phase {
            Phase::Wedged { .. } => continue,
            Phase::RollbackOwed { reason, .. } => reason,
            _ => Reason::AgentStopping,
        };
        let _ = roll_back(shared, &owner, &txid, reason).await;
    }
}

/// The agent's view for `status`: every unfinished transaction in memory, with its phase and
/// the journal problem it has, if any.
pub fn status(shared: &Shared) -> Response {
    let now = journal::boottime_ns();
    let list: Vec<Value> = shared
        .busy_owners()
        .iter()
        .filter_map(|o| {
            let slot = o.slot();
            let c = slot.as_ref()?;
            let mut v = txn::status_entry(c.rec.head(), now);
            v["phase"] = json!(c.phase.name());
            if let Phase::RollbackOwed { attempts, error, .. } = &c.phase {
                v["rollback_attempts"] = json!(attempts);
                v["rollback_error"] = json!(error);
            }
            if let Phase::Wedged { error } = &c.phase {
                v["journal_error"] = json!(error);
            }
            if let Some(e) = &c.journal_error {
                v["journal_error"] = json!(e);
            }
            Some(v)
        })
        .collect();
    Response::ok(json!({"pid": std::process::id(), "transactions": list, "committed": super::guard::status(shared)}))
}

/// Journal recovery on start (DESIGN §2), before the socket serves: every unfinished record
/// gets its owner; damaged files are reported loudly; pins that belong to no unfinished
/// transaction are removed.
pub async fn recover(shared: &Arc<Shared>) {
    let now = journal::boottime_ns();
    let scan = {
        let _lock = shared.journal.try_lock();
        match shared.journal.scan() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot read the journal at start: {e}; nothing recovered");
                return;
            }
        }
    };
    for e in &scan.skipped {
        tracing::error!("DAMAGED journal file, not recovered: {e} — inspect it; `ctguard status` lists it");
    }
    // The committed policies to guard, per target (those of this boot).
    let mut guarded: Vec<TxnRecord> = Vec::new();
    for r in &scan.records {
        let id = (r.target.dev, r.target.ino);
        if guarded.iter().any(|g| (g.target.dev, g.target.ino) == id) {
            continue;
        }
        if let Some(g) = super::guard::guarded_record(&scan.records, id, &shared.boot_id) {
            guarded.push(g.clone());
        }
    }
    for g in guarded {
        let owner = shared.owner((g.target.dev, g.target.ino));
        super::guard::start(shared, &owner, g);
    }
    let unfinished: Vec<TxnRecord> = scan.records.into_iter().filter(|r| !r.state.is_finished()).collect();
    clean_pins(shared, &unfinished, &scan.skipped);
    let keep: Vec<TxnId> = unfinished.iter().map(|r| r.id.clone()).collect();
    shared.journal.prune_reserves(&keep);
    // Closed first (another boot), then rolled back newest first, then re-armed: one owner
    // per target, so records that share a target (left by an older agent's race) are handled
    // one after the other.
    let mut work: Vec<(TxnRecord, Recovery)> = Vec::new();
    for mut rec in unfinished {
        let action = txn::recovery_action(&rec, &shared.boot_id, now);
        if action == Recovery::CloseRebooted {
            let _ = rec.to_rolled_back(Reason::Reboot, now_wall());
            let _ = write_record(shared, None, &rec);
            if let Some(p) = &rec.target.pin {
                unpin(Path::new(p));
            }
            tracing::warn!(txid = rec.id.as_str(), "closed: the host rebooted (nothing restored)");
        } else if action != Recovery::Nothing {
            work.push((rec, action));
        }
    }
    work.sort_by(|(a, x), (b, y)| {
        let rearm = |r: &Recovery| matches!(r, Recovery::Rearm { .. });
        rearm(x).cmp(&rearm(y)).then_with(|| (b.created_wall, &b.id).cmp(&(a.created_wall, &a.id)))
    });
    let target_count = |id: (u64, u64), w: &[(TxnRecord, Recovery)]| {
        w.iter().filter(|(r, a)| (r.target.dev, r.target.ino) == id && matches!(a, Recovery::Rearm { .. })).count()
    };
    for (rec, action) in &work {
        let txid = rec.id.as_str().to_string();
        let tid = (rec.target.dev, rec.target.ino);
        // Several transactions left pending on one target: none of them can be confirmed
        // safely; roll them all back.
        let action = match action {
            Recovery::Rearm { .. } if target_count(tid, &work) > 1 => Recovery::RollBackNow,
            a => *a,
        };
        let owner = match shared.claim(tid, rec.clone()) {
            Ok(o) => o,
            Err(b) => {
                tracing::error!(
                    txid = %txid,
                    "another unfinished transaction holds its target ({}, {}): left as it is; operator needed",
                    b.txid,
                    b.phase.name()
                );
                continue;
            }
        };
        let _op = owner.op.lock().await;
        match action {
            Recovery::Rearm { remaining_ns } => {
                tracing::warn!(txid = %txid, "re-armed: {} s left", remaining_ns / 1_000_000_000);
                owner.update(&txid, |c| c.phase = Phase::Pending);
                if let Some(d) = &rec.deadline {
                    arm_timer(shared, &owner, &txid, d.boottime_ns);
                }
            }
            _ => {
                tracing::warn!(txid = %txid, "found {} at start: rolling back", rec.state.name());
                let _ = roll_back(shared, &owner, &txid, Reason::Recovered).await;
            }
        }
    }
}

/// Removes pins under `$RUN_DIR/ns` that no unfinished (or unreadable) record names: left by
/// a crash between pinning and the first journal write, or by a crash during a commit.
fn clean_pins(shared: &Shared, unfinished: &[TxnRecord], damaged: &[crate::journal::JournalError]) {
    let dir = shared.opts.run_dir.join("ns");
    let Ok(entries) = std::fs::read_dir(&dir) else { return };
    let damaged_text: Vec<String> = damaged.iter().map(|e| e.to_string()).collect();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let wanted = unfinished.iter().any(|r| r.id.as_str() == name || r.target.pin.as_deref() == e.path().to_str())
            || damaged_text.iter().any(|d| d.contains(&name));
        if !wanted {
            tracing::info!("removing a leftover namespace pin {}", e.path().display());
            unpin(&e.path());
        }
    }
}
