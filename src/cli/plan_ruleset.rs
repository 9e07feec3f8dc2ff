//! `ctguard plan --ruleset FILE [--format F] [--force]`: what `apply --ruleset FILE` would do,
//! without doing it (DESIGN §5). The file is read and validated exactly as `apply` reads it
//! ([`super::txn::load_ruleset`]) and prepared by the same function the agent's ruleset engine
//! runs ([`crate::backend::ruleset_txn::prepare`]: snapshot, kernel check of the file and of
//! the rollback, the result built in a scratch namespace, the ssh-lockout lint), so the exit
//! code is the one `apply` would give: 2 bad input, 4 a transaction unfinished on the target
//! (read from the journal), 3 refused by the kernel or by a lint error without `--force`, 0
//! otherwise. Nothing in the target changes (the kernel checks are `nft
//! -c` and scratch namespaces), and no agent is asked or started.

use std::fmt::Write as _;

use serde_json::json;

use super::args::{Global, PlanArgs};
use crate::backend::ruleset_txn::{self, chain_text, PrepareOptions, RulesetPlan, RulesetTxnError};
use crate::exit::{Exit, Failure};
use crate::lint::{Severity, SshConn};
use crate::netns::TargetSpec;
use crate::snapshot::RulesetFormat;

/// Lines of context kept around each change in the printed diff.
const CONTEXT: usize = 3;

pub(super) fn run(args: &PlanArgs, global: &Global) -> Result<Exit, Vec<Failure>> {
    let Some(path) = args.ruleset.as_deref() else {
        return Err(vec![Failure::internal("plan --ruleset without a file")]);
    };
    // Read and validated before the privilege check, as `plan` validates a policy.
    let file = super::txn::load_ruleset(path, args.format)?;
    super::privilege::require_root_for_plan()?;
    let (spec, target, _facts) = super::open_target(global)?;
    let label = match &spec {
        TargetSpec::Current if target.is_initial() => "host (initial network namespace)".to_string(),
        TargetSpec::Current => "the caller's network namespace".to_string(),
        _ => format!("network namespace {}", target.path().display()),
    };
    // Apply refuses a second transaction on a target before it reads anything (exit 4).
    if let Some(busy) = unfinished_on(global, target.id) {
        return Err(vec![Failure::new(Exit::Busy, format!("{busy}; apply --ruleset would refuse until it ends"))]);
    }
    let ssh = requester_ssh();
    let opts = PrepareOptions { ssh, force: args.force, diff: true, commit_checks_file: false };
    let prepared = target
        .run(move || ruleset_txn::prepare(&file.text, &file.format, opts))
        .map_err(|e| vec![Failure::internal(e.to_string())])?;
    let plan = match prepared {
        Ok(p) => p,
        Err(e) => {
            if global.json {
                super::print_json(&failed_json(&label, &e));
            }
            return Err(vec![Failure::new(e.exit(), chain_text(&e))]);
        }
    };
    let verdict = plan.verdict();
    if global.json {
        super::print_json(&report_json(&label, &plan, ssh.is_some(), &verdict));
    } else {
        print!("{}", report_text(&label, path, &plan, ssh.is_some(), &verdict));
    }
    match verdict {
        Ok(_) => Ok(Exit::Ok),
        Err(RulesetTxnError::Lint(errors)) => Err(vec![Failure::refused(format!(
            "lint found {} error(s); apply --ruleset would refuse without --force: {}",
            errors.len(),
            errors.join("; ")
        ))]),
        Err(e) => Err(vec![Failure::new(e.exit(), chain_text(&e))]),
    }
}

/// The unfinished transaction on the target `id` (device, inode of its namespace), from the
/// journal (read only; no agent asked): `transaction ID is pending on this target`. `None`
/// when there is none or the journal cannot be read (apply then decides).
fn unfinished_on(global: &Global, id: (u64, u64)) -> Option<String> {
    let journal = crate::journal::Journal::attach(&global.state_dir).ok()?;
    let records = journal.list().ok()?;
    records
        .iter()
        .find(|r| !r.state.is_finished() && (r.target.dev, r.target.ino) == id)
        .map(|r| format!("transaction {} is {} on this target", r.id, r.state.outcome()))
}

/// The requester's SSH connection as the agent derives it for `apply` (DESIGN §4): from this
/// process's ancestry (the nearest sshd and the socket it holds), else the `SSH_CONNECTION`
/// claim. When the ancestry cannot be read, the claim alone, with a warning (`apply` would
/// refuse such a requester unless `--allow-same-connection`).
fn requester_ssh() -> Option<SshConn> {
    let claim = || std::env::var("SSH_CONNECTION").ok().and_then(|v| SshConn::from_env_value(&v));
    match crate::agent::proof::origin_of(std::process::id() as i32) {
        Ok(origin) => origin.conn().map(|c| c.lint_conn()).or_else(claim),
        Err(e) => {
            eprintln!(
                "ctguard: warning: cannot identify your SSH connection ({}); apply would refuse without --allow-same-connection",
                crate::exit::escape_for_terminal(&e.to_string())
            );
            claim()
        }
    }
}

/// The printed diff: changed lines with [`CONTEXT`] kept lines around them, `  …` between
/// runs that are further apart. Empty when nothing changes.
fn context_diff(full: &[String]) -> Vec<String> {
    let changed: Vec<usize> = full.iter().enumerate().filter(|(_, l)| !l.starts_with("  ")).map(|(i, _)| i).collect();
    if changed.is_empty() {
        return Vec::new();
    }
    let mut keep = vec![false; full.len()];
    for &i in &changed {
        let lo = i.saturating_sub(CONTEXT);
        let hi = (i + CONTEXT).min(full.len() - 1);
        keep[lo..=hi].iter_mut().for_each(|k| *k = true);
    }
    let mut out = Vec::new();
    let mut gap = false;
    for (i, l) in full.iter().enumerate() {
        if keep[i] {
            if gap && !out.is_empty() {
                out.push("  …".to_string());
            }
            gap = false;
            out.push(l.clone());
        } else {
            gap = true;
        }
    }
    out
}

/// The diff of the plan (`None` when the result could not be built: the error text).
fn diff_of(plan: &RulesetPlan) -> Result<Vec<String>, String> {
    match &plan.result {
        Some(Ok(r)) => Ok(context_diff(&r.diff())),
        Some(Err(e)) => Err(e.clone()),
        None => Err("not built".into()),
    }
}

/// How the file is applied, in words: `nft -f`, or `IPv4 with iptables-nft-restore`.
fn applied_as(plan: &RulesetPlan) -> String {
    let c = &plan.candidate;
    match (c.format, c.family, c.variant) {
        (RulesetFormat::Nft, _, _) => "an nft script, one `nft -f` transaction".into(),
        (RulesetFormat::Iptables, f, v) => {
            let v6 = f.is_some_and(|f| f.is_v6());
            let tool = v.unwrap_or(crate::live::fw::IptVariant::Nft).tool(v6, "-restore");
            format!("an {} iptables dump, applied with {tool}", if v6 { "IPv6" } else { "IPv4" })
        }
    }
}

/// What the lint could evaluate: `evaluated`, `no-ssh` (no SSH connection: nothing to lock
/// out) or `unavailable` (the result could not be built).
fn lint_state(plan: &RulesetPlan, ssh: bool) -> &'static str {
    match (&plan.result, ssh) {
        (_, false) => "no-ssh",
        (Some(Ok(_)), true) => "evaluated",
        _ => "unavailable",
    }
}

fn report_text(
    label: &str,
    path: &str,
    plan: &RulesetPlan,
    ssh: bool,
    verdict: &Result<Vec<String>, RulesetTxnError>,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "target:  {label}");
    let _ = writeln!(s, "ruleset: {} ({})", crate::exit::escape_for_terminal(path), applied_as(plan));
    let _ = writeln!(s, "\nkernel check: ok (the file, and the rollback to the current state)");
    let diff = diff_of(plan);
    match &diff {
        Ok(d) if d.is_empty() => {
            let _ = writeln!(s, "\nchanges: none (the file leaves the firewall as it is)");
        }
        Ok(d) => {
            let _ = writeln!(s, "\nchanges (listing of the target, counters zeroed):");
            for l in d {
                // Tabs as spaces: the listing's indentation, readable (and not escaped).
                let _ = writeln!(s, "  {}", crate::exit::escape_for_terminal(&l.replace('\t', "    ")));
            }
        }
        Err(e) => {
            let _ = writeln!(s, "\nchanges: unknown (the result could not be built: {e})");
        }
    }
    let _ = writeln!(s, "\nlint:");
    match lint_state(plan, ssh) {
        "no-ssh" => {
            let _ = writeln!(s, "  ssh-lockout: not evaluated (no SSH connection to lock out)");
        }
        "unavailable" => {
            let _ = writeln!(s, "  ssh-lockout: could not be evaluated (see the warnings)");
        }
        _ if plan.findings.is_empty() => {
            let _ = writeln!(s, "  no findings");
        }
        _ => {}
    }
    for f in &plan.findings {
        let _ = writeln!(s, "  {f}");
    }
    if plan.force && plan.findings.iter().any(|f| f.severity == Severity::Error) {
        let _ = writeln!(s, "  (--force: apply --ruleset would proceed past these errors)");
    }
    let warnings = match verdict {
        Ok(w) => w.clone(),
        Err(_) => plan.notes.clone(),
    };
    let warnings: Vec<&String> = warnings.iter().filter(|w| !w.starts_with("forced past: ")).collect();
    if !warnings.is_empty() {
        let _ = writeln!(s, "\nwarnings:");
        for w in warnings {
            let _ = writeln!(s, "  {w}");
        }
    }
    let changed = diff.as_ref().map_or("unknown", |d| if d.is_empty() { "no" } else { "yes" });
    let _ = writeln!(s, "\nchanged: {changed}");
    s
}

fn report_json(
    label: &str,
    plan: &RulesetPlan,
    ssh: bool,
    verdict: &Result<Vec<String>, RulesetTxnError>,
) -> serde_json::Value {
    let c = &plan.candidate;
    let diff = diff_of(plan);
    let warnings = match verdict {
        Ok(w) => w.clone(),
        Err(_) => plan.notes.clone(),
    };
    json!({
        "kind": "ruleset",
        "target": label,
        "format": match c.format { RulesetFormat::Nft => "nft", RulesetFormat::Iptables => "iptables" },
        "family": c.family.map(|f| if f.is_v6() { "ipv6" } else { "ipv4" }),
        "restore_tool": c.variant.zip(c.family).map(|(v, f)| v.tool(f.is_v6(), "-restore")),
        "changed": diff.as_ref().ok().map(|d| !d.is_empty()),
        "diff": diff.as_ref().ok(),
        "diff_error": diff.as_ref().err(),
        "check": {"ok": true},
        "lint": lint_state(plan, ssh),
        "findings": plan.findings,
        "errors": plan.findings.iter().filter(|f| f.severity == Severity::Error).count(),
        "force": plan.force,
        "warnings": warnings,
    })
}

/// The `data` when the preparation refused: the target and, for a kernel refusal, the check.
fn failed_json(label: &str, e: &RulesetTxnError) -> serde_json::Value {
    let check = match e {
        RulesetTxnError::CandidateRefused(_)
        | RulesetTxnError::CandidateIptRefused(_)
        | RulesetTxnError::RestoreRefused(_) => json!({"ok": false, "error": chain_text(e)}),
        _ => serde_json::Value::Null,
    };
    json!({"kind": "ruleset", "target": label, "check": check})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn context_diff_keeps_three_lines_around_each_change_and_marks_gaps() {
        assert!(context_diff(&lines(&["  a", "  b"])).is_empty());
        let full: Vec<String> = (0..20).map(|i| format!("  l{i}")).collect();
        let mut d = full.clone();
        d[2] = "+ new".into();
        d[15] = "- old".into();
        let out = context_diff(&d);
        assert_eq!(
            out,
            lines(&[
                "  l0", "  l1", "+ new", "  l3", "  l4", "  l5", "  …", "  l12", "  l13", "  l14", "- old", "  l16",
                "  l17", "  l18"
            ])
        );
        // Close changes share their context: no gap marker between them.
        let mut d = full;
        d[5] = "+ a".into();
        d[9] = "+ b".into();
        assert!(!context_diff(&d).contains(&"  …".to_string()));
    }
}
