//! `apply` in the agent: validation, the target and its pin, the proof, prepare → journal
//! PREPARED → apply → rollback check → journal PENDING → timer, then the first probe round.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::decide::*;
use super::engine::ApplyInput;
use super::lifecycle::*;
use super::proof;
use super::protocol::{ApplyRequest, Response, VERSION};
use super::server::*;
use super::worker::Worker;
use crate::exit::Exit;
use crate::journal;
use crate::lint::SshConn;
use crate::model::auto::MachineFacts;
use crate::model::names::Tag;
use crate::model::{parse_policy, Format, Policy};
use crate::netns::{unpin, Target, TargetSpec};
use crate::probe::{self, Probe, ProbeResult};
use crate::txn::{self, Deadline, Kind, Reason, Requester, State, TargetRecord, TxnId, TxnRecord};

/// The tools a transaction may run, by absolute path (journaled, DESIGN §1).
pub const JOURNALED_TOOLS: &[&str] = &[
    "nft",
    "iptables-nft-restore",
    "ip6tables-nft-restore",
    "iptables-legacy-restore",
    "ip6tables-legacy-restore",
    "ipset",
    "conntrack",
];

pub(super) fn journaled_tools() -> std::collections::BTreeMap<String, String> {
    JOURNALED_TOOLS
        .iter()
        .filter_map(|t| crate::backend::exec::Tool::find(t).ok())
        .map(|t| (t.name, t.path.display().to_string()))
        .collect()
}

pub(super) fn ram_facts() -> MachineFacts {
    MachineFacts::with_ram(crate::sysctl::mem_total_bytes().unwrap_or(0))
}

pub(super) fn load_policy(a: &ApplyRequest) -> Result<Policy, Response> {
    let Some(text) = &a.policy_text else { return Ok(Policy::builtin()) };
    let format = match a.policy_format.as_deref() {
        Some("json") => Format::Json,
        _ => Format::Toml,
    };
    parse_policy(text, format).map_err(|errs| {
        Response::fail(Exit::BadInput, errs.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))
    })
}

pub(super) async fn apply(shared: &Arc<Shared>, a: ApplyRequest, peer_pid: Option<i32>, peer_uid: u32) -> Response {
    let policy = match load_policy(&a) {
        Ok(p) => p,
        Err(r) => return r,
    };
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
    // The target: --netns, or the requester's own namespace (read while it is connected).
    let (label, spec) = match &a.netns {
        Some(n) => match TargetSpec::parse(n) {
            Ok(s) => (n.clone(), s),
            Err(e) => return Response::fail(Exit::BadInput, e.to_string()),
        },
        None => match peer_pid {
            Some(pid) => ("caller".to_string(), TargetSpec::Path(PathBuf::from(format!("/proc/{pid}/ns/net")))),
            None => return Response::fail(Exit::BadInput, "cannot tell the caller's namespace (no peer pid)"),
        },
    };
    let target = match Target::open(&spec) {
        Ok(t) => t,
        Err(e) => return Response::fail(Exit::BadInput, e.to_string()),
    };
    // The caller's namespace may be a named one (`ip netns exec NAME ctguard apply`): record
    // its name and path, which outlive the caller's pid and a pin hidden in a private mount
    // namespace.
    let (label, target_path) = match (label.as_str(), named_netns_of(target.id)) {
        ("caller", Some((name, path))) => (name, path),
        ("caller", None) if target.is_initial() => ("host".to_string(), target.path().display().to_string()),
        _ => (label, target.path().display().to_string()),
    };
    let id = target.id;
    // Persistence describes the host's boot: a namespace has none. (A policy file saying
    // `persist = true` applied to a namespace — `ctguard restore` re-applying the saved one —
    // is applied, and its commit reports that nothing was persisted.)
    if a.options.persist && !target.is_initial() {
        return Response::fail(Exit::BadInput, "--persist: only the host's own namespace boots from /etc");
    }
    // One pending transaction per target.
    if let Some(p) = unfinished(shared).into_iter().find(|r| (r.target.dev, r.target.ino) == id) {
        let left = p.seconds_left(journal::boottime_ns()).unwrap_or(0);
        return Response {
            v: VERSION,
            exit: Exit::Busy.code(),
            error: Some(format!("transaction {} is {} on this target ({left} s left)", p.id, p.state.name())),
            data: json!({"pending": p.id.as_str(), "seconds_left": left}),
        };
    }
    if let Err(e) = shared.journal.check_room() {
        return Response::fail(Exit::BadInput, format!("state dir: {e}"));
    }
    let txid = match shared.journal.fresh_id(now_wall()) {
        Ok(id) => id,
        Err(e) => return Response::fail(Exit::Internal, e.to_string()),
    };
    let tag = match Tag::new(txid.as_str()) {
        Ok(t) => t,
        Err(e) => return Response::fail(Exit::Internal, e),
    };
    let pin = shared.opts.run_dir.join("ns").join(txid.as_str());
    if let Err(e) = target.pin(&pin) {
        return Response::fail(Exit::BadInput, format!("cannot pin the target namespace: {e}"));
    }
    let worker = match worker_for(shared, target).await {
        Ok(w) => w,
        Err(r) => {
            unpin(&pin);
            return r;
        }
    };
    if a.options.auto_confirm {
        let p2 = probes.clone();
        let local = worker
            .call(move || {
                p2.iter().filter(|p| probe::aims_at_local_address(p)).map(|p| p.to_string()).collect::<Vec<_>>()
            })
            .await;
        match local {
            Ok(l) if l.is_empty() => {}
            Ok(l) => {
                unpin(&pin);
                return Response::fail(
                    Exit::BadInput,
                    format!(
                        "--auto-confirm: {} aim(s) at the target's own addresses; over loopback they prove nothing",
                        l.join(", ")
                    ),
                );
            }
            Err(e) => {
                unpin(&pin);
                return Response::fail(Exit::Internal, e.to_string());
            }
        }
    }
    let kind = if a.ruleset.is_some() { Kind::Ruleset } else { Kind::Policy };
    let previous_undo = if kind == Kind::Policy { last_committed(shared, id).map(|r| r.undo) } else { None };
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
    let engine = shared.engines.of(kind);
    let prepared = match worker.call(move || engine.prepare(&input)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            unpin(&pin);
            return Response::fail(e.exit, e.message);
        }
        Err(e) => {
            unpin(&pin);
            return Response::fail(Exit::Internal, e.to_string());
        }
    };
    let warnings = prepared.warnings();
    let target_rec = TargetRecord {
        label: label.clone(),
        path: target_path,
        pin: Some(pin.display().to_string()),
        dev: id.0,
        ino: id.1,
    };
    let ssh = origin.as_ref().and_then(|o| o.conn().map(|c| c.to_env_value())).or_else(|| a.ssh.clone());
    let requester = Requester { uid: peer_uid, pid: peer_pid.unwrap_or(0), ssh, origin: origin.clone() };
    let mut rec = TxnRecord::new(txid.clone(), kind, target_rec, requester, shared.boot_id.clone(), now_wall());
    match &a.ruleset {
        Some(r) => rec.ruleset = Some(r.text.clone()),
        None => rec.policy = serde_json::to_value(&policy).ok(),
    }
    rec.before = Some(prepared.before());
    rec.undo = prepared.planned_undo();
    rec.tools = journaled_tools();
    rec.options = a.options.clone();
    rec.genid_before = rec.undo.get("genid_before").and_then(serde_json::Value::as_u64).map(|g| g as u32);
    if let Err(e) = shared.journal.write(&rec) {
        unpin(&pin);
        return Response::fail(Exit::BadInput, format!("journal: {e}"));
    }
    fault("apply:after-prepared");
    // The change. From here on, every failure rolls back.
    let undo = match worker.call(move || prepared.apply()).await {
        Ok(Ok(u)) => u,
        Ok(Err(e)) => return fail_and_roll_back(shared, &worker, rec, e.exit, e.message).await,
        Err(e) => return fail_and_roll_back(shared, &worker, rec, Exit::Internal, e.to_string()).await,
    };
    fault("apply:after-apply");
    rec.undo = undo.clone();
    rec.genid_after = undo.get("genid_after").and_then(serde_json::Value::as_u64).map(|g| g as u32);
    let engine = shared.engines.of(kind);
    let undo2 = undo.clone();
    match worker.call(move || engine.check_rollback(&undo2)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let msg = format!("the rollback does not pass the kernel check, so the change is undone: {e}");
            return fail_and_roll_back(shared, &worker, rec, Exit::Refused, msg).await;
        }
        Err(e) => return fail_and_roll_back(shared, &worker, rec, Exit::Internal, e.to_string()).await,
    }
    let engine = shared.engines.of(kind);
    let undo3 = undo.clone();
    rec.after = worker.call(move || engine.listing(&undo3)).await.ok().and_then(Result::ok);
    let now_bt = journal::boottime_ns();
    let deadline_bt = now_bt + a.timeout_secs * 1_000_000_000;
    let deadline =
        Deadline { boottime_ns: deadline_bt, boot_id: shared.boot_id.clone(), wall_unix: now_wall() + a.timeout_secs };
    if let Err(e) = rec.to_pending(deadline, now_wall()) {
        return fail_and_roll_back(shared, &worker, rec, Exit::Internal, e.to_string()).await;
    }
    if let Err(e) = shared.journal.write(&rec) {
        return fail_and_roll_back(shared, &worker, rec, Exit::Internal, format!("journal: {e}")).await;
    }
    fault("apply:after-pending");
    arm_timer(shared, txid.as_str().to_string(), deadline_bt).await;
    tracing::info!(txid = txid.as_str(), target = %label, "applied; pending for {} s", a.timeout_secs);
    // The command that confirms: from a new connection when the proof applies.
    let confirm_cmd = confirm_command(shared, origin.as_ref().and_then(|o| o.conn()), txid.as_str());
    let mut probe_results = Value::Null;
    let mut state = "PENDING";
    // A ruleset that changed no listing is committed at once (DESIGN §8): nothing to guard.
    let noop = kind == Kind::Ruleset && rec.before.is_some() && rec.before == rec.after;
    if noop {
        let r = commit(shared, rec.clone(), "no-op: applying the ruleset changed no listing; committed at once").await;
        if r.exit != 0 {
            return r;
        }
        state = "COMMITTED";
    } else if !probes.is_empty() {
        // The first round: apply answers only after it (exit 5 if it rolled back).
        let results = run_probes(&worker, probes.clone()).await;
        probe_results = json!(results);
        let failed: Vec<String> =
            results.iter().filter(|r| !r.ok).map(|r| format!("{}: {}", r.probe, r.detail)).collect();
        if !failed.is_empty() {
            cancel_timer(shared, txid.as_str()).await;
            let detail = failed.join("; ");
            return match do_rollback(shared, &worker, &mut rec, Reason::ProbeFailed(detail.clone())).await {
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
        let _ = shared.journal.write(&rec);
        if a.options.auto_confirm {
            let r = commit(shared, rec.clone(), "auto-confirmed: every probe passed").await;
            if r.exit != 0 {
                return r;
            }
            state = "COMMITTED";
        } else if let Some(every) = a.options.probe_interval_secs {
            spawn_probe_rounds(shared.clone(), worker.clone(), txid.clone(), probes, Duration::from_secs(every));
        }
    }
    Response::ok(json!({
        "state": state,
        "noop": noop,
        "probes": probe_results,
        "needs_new_connection": origin.as_ref().is_some_and(|o| o.conn().is_some()),
        "txid": txid.as_str(),
        "target": label,
        "deadline": txn::format_rfc3339(now_wall() + a.timeout_secs),
        "seconds_left": a.timeout_secs,
        "confirm": confirm_cmd,
        "warnings": warnings,
    }))
}

/// `ctguard` with the run and state dirs this agent serves when they are not the defaults, so a
/// printed confirm command reaches this agent.
pub(super) fn ctguard_invocation(shared: &Shared) -> String {
    let mut s = String::from("ctguard");
    if shared.opts.state_dir != Path::new("/var/lib/ctguard") {
        s.push_str(&format!(" --state-dir {}", shared.opts.state_dir.display()));
    }
    if shared.opts.run_dir != Path::new(super::client::UNIT_RUN_DIR) {
        s.push_str(&format!(" --run-dir {}", shared.opts.run_dir.display()));
    }
    s
}

/// The command that confirms `txid` from a new connection (or locally).
pub(super) fn confirm_command(shared: &Shared, conn: Option<&proof::SshConn4>, txid: &str) -> String {
    let local = format!("{} confirm {txid}", ctguard_invocation(shared));
    match conn {
        Some(c) => proof::ConfirmRefusal { conn: *c }
            .new_connection_command(Some(txid))
            .replace(&format!("ctguard confirm {txid}"), &local),
        None => local,
    }
}

/// Each probe's timeout.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

pub(super) async fn run_probes(worker: &Worker, probes: Vec<Probe>) -> Vec<ProbeResult> {
    match worker.call(move || probe::run_all(&probes, PROBE_TIMEOUT)).await {
        Ok(r) => r,
        Err(e) => vec![ProbeResult { probe: "worker".into(), ok: false, detail: e.to_string(), elapsed_ms: 0 }],
    }
}

/// `--probe-interval`: repeats the probes until the transaction is no longer pending; any
/// failure rolls back at once.
pub(super) fn spawn_probe_rounds(
    shared: Arc<Shared>,
    worker: Worker,
    txid: TxnId,
    probes: Vec<Probe>,
    every: Duration,
) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Ok(mut rec) = shared.journal.load(&txid) else { return };
            if rec.state != State::Pending {
                return;
            }
            let results = run_probes(&worker, probes.clone()).await;
            let failed: Vec<String> =
                results.iter().filter(|r| !r.ok).map(|r| format!("{}: {}", r.probe, r.detail)).collect();
            // The state may have changed while the probes ran.
            let Ok(fresh) = shared.journal.load(&txid) else { return };
            if fresh.state != State::Pending {
                return;
            }
            if !failed.is_empty() {
                tracing::warn!(txid = txid.as_str(), "probe failed: {}; rolling back", failed.join("; "));
                cancel_timer(&shared, txid.as_str()).await;
                let _ = do_rollback(&shared, &worker, &mut rec, Reason::ProbeFailed(failed.join("; "))).await;
                return;
            }
        }
    });
}

/// The latest COMMITTED policy transaction on a target (the one a new apply replaces).
pub(super) fn last_committed(shared: &Shared, id: (u64, u64)) -> Option<TxnRecord> {
    let all = shared.journal.list().ok()?;
    all.into_iter()
        .rev()
        .find(|r| (r.target.dev, r.target.ino) == id && r.kind == Kind::Policy)
        .filter(|r| r.state == State::Committed)
}

pub(super) async fn fail_and_roll_back(
    shared: &Arc<Shared>,
    worker: &Worker,
    mut rec: TxnRecord,
    exit: Exit,
    msg: String,
) -> Response {
    tracing::error!(txid = rec.id.as_str(), "{msg}; rolling back");
    match do_rollback(shared, worker, &mut rec, Reason::ApplyFailed(msg.clone())).await {
        Ok(()) => Response::fail(exit, format!("{msg} (rolled back)")),
        Err(e) => Response::fail(Exit::RollbackFailed, format!("{msg}; then the rollback failed: {e}")),
    }
}

/// A name under /run/netns whose namespace is `id`, with its path.
pub(super) fn named_netns_of(id: (u64, u64)) -> Option<(String, String)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(crate::netns::NETNS_RUN_DIR).ok()?.flatten().find_map(|e| {
        let m = std::fs::metadata(e.path()).ok()?;
        ((m.dev(), m.ino()) == id)
            .then(|| (e.file_name().to_string_lossy().into_owned(), e.path().display().to_string()))
    })
}
