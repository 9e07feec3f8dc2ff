//! `ctguard plan`: validate, render, diff against the live state of the target, plan the
//! accept insertions, lint; `--check` also asks the kernel. Changes nothing (DESIGN §5).

use std::fmt::Write as _;

use serde_json::json;

use super::args::{Global, PlanArgs};
use crate::backend::live as live_backend;
use crate::backend::policy_txn::{self, variant_of, PolicyRequest, PolicyUndo, PrepareMode, Removed};
use crate::exit::{Exit, Failure};
use crate::lint::{Finding, Severity, SshConn};
use crate::live::iptables_save;
use crate::model::auto::MachineFacts;
use crate::model::names::Tag;
use crate::model::{Backend, Policy};
use crate::netns::TargetSpec;
use crate::render::iptables::{notrack_rules, IpFamily, CHAIN_OUT, CHAIN_PRE, RAW_TABLE};
use crate::render::nft_ir::table_for;
use crate::render::nft_script::table_block;
use crate::render::planner::{InsertionPlan, Position, RuleSpec};
use crate::render::sysctl::SysctlChange;

/// What `plan` found, in a form both printers use.
struct Report {
    target: String,
    initial_ns: bool,
    backend: Backend,
    /// Lines of ctguard's own objects now and after apply.
    current: Vec<String>,
    desired: Vec<String>,
    plan: InsertionPlan,
    /// The previous transaction's accepts apply removes (they are re-planned).
    removals: Vec<String>,
    /// The accepts after apply are the ones removed (the same rules, tags aside): re-planning
    /// them changes nothing.
    same_accepts: bool,
    sysctls: Vec<SysctlChange>,
    findings: Vec<Finding>,
    check: Option<Result<(), String>>,
}

impl Report {
    fn changed(&self) -> bool {
        self.current != self.desired
            || !self.same_accepts
            || self.sysctls.iter().any(|c| !c.unchanged && c.skipped.is_none())
    }
}

/// The accept rules, tags read as `ctguard:preview`, as comparable lines: (front end, table,
/// chain, rule).
fn accept_keys(removed: &[Removed], plan: &InsertionPlan) -> (Vec<String>, Vec<String>) {
    let norm = crate::model::names::normalize_tags;
    let mut gone: Vec<String> = removed
        .iter()
        .map(|r| match r {
            Removed::Nft { family, table, chain, text, .. } => {
                let text = text.split(" # handle ").next().unwrap_or(text).trim();
                format!("nft {family} {table} {chain}: {}", norm(text))
            }
            Removed::Iptables { variant, v6, table, line, .. } => {
                format!("{} {table}: {}", crate::live::fw::IptVariant::from(*variant).tool(*v6, ""), norm(line.trim()))
            }
        })
        .collect();
    let mut new = Vec::new();
    for ins in &plan.insertions {
        match (&ins.owner, &ins.rule) {
            (crate::live::fw::Owner::Nft { family, table }, RuleSpec::Nft(rule)) => {
                new.push(format!("nft {family} {table} {}: {}", ins.chain_name, norm(rule.trim())));
            }
            (crate::live::fw::Owner::Iptables { variant, v6, table }, RuleSpec::Iptables(specs)) => {
                for spec in specs {
                    let line = format!("-A {} {}", ins.chain_name, crate::render::iptables::spec_to_line(spec));
                    new.push(format!("{} {table}: {}", variant.tool(*v6, ""), norm(&line)));
                }
            }
            _ => {}
        }
    }
    gone.sort();
    new.sort();
    (gone, new)
}

pub(super) fn run(args: &PlanArgs, global: &Global) -> Result<Exit, Vec<Failure>> {
    // The policy is validated before the privilege check (a typo is reported to anyone).
    let own_policy = match (&args.from, args.remove) {
        (None, false) => Some(super::load_policy(args.policy.as_deref())?.policy),
        _ => None,
    };
    super::privilege::require_root_for_plan()?;
    let (spec, target, facts) = super::open_target(global)?;
    let bad = |m: String| vec![Failure::bad_input(m)];
    let policy = if let Some(txid) = &args.from {
        let id = crate::txn::TxnId::parse(txid).map_err(|e| bad(format!("--from: {e}")))?;
        let j = crate::journal::Journal::attach(&global.state_dir).map_err(|e| bad(e.to_string()))?;
        let rec = j.load(&id).map_err(|e| bad(format!("--from: {e}")))?;
        if rec.state != crate::txn::State::Committed || rec.kind != crate::txn::Kind::Policy {
            return Err(bad(format!("--from {txid}: not a committed policy transaction ({})", rec.state.outcome())));
        }
        let v = rec.policy.as_ref().ok_or_else(|| bad(format!("--from {txid}: the record holds no policy")))?;
        crate::persist::policy_from_record(v).map_err(|e| bad(format!("--from {txid}: {e}")))?
    } else if args.remove {
        let j = crate::journal::Journal::attach(&global.state_dir).map_err(|e| bad(e.to_string()))?;
        let records = j.list().map_err(|e| bad(e.to_string()))?;
        crate::persist::removal_policy(&records, target.id).map_err(bad)?
    } else {
        own_policy.unwrap_or_else(crate::model::Policy::builtin)
    };
    let ssh = std::env::var("SSH_CONNECTION").ok().and_then(|v| SshConn::from_env_value(&v));
    let initial_ns = target.is_initial();
    let label = match &spec {
        TargetSpec::Current if initial_ns => "host (initial network namespace)".to_string(),
        TargetSpec::Current => "the caller's network namespace".to_string(),
        _ => format!("network namespace {}", target.path().display()),
    };
    let previous = previous_committed(global, target.id)?;
    let report = target
        .run(|| build_report(&policy, args.check, facts, ssh, previous, label, initial_ns))
        .map_err(|e| vec![Failure::internal(e.to_string())])??;

    if global.json {
        super::print_json(&report_json(&report));
    } else {
        print!("{}", report_text(&report));
    }
    // Exit codes: a sysctl that cannot be written is a failed precondition (2); a lint error
    // or a failed kernel check means apply would refuse (3).
    let problems: Vec<&Finding> = report.findings.iter().filter(|f| f.code == "sysctl-unwritable").collect();
    if !problems.is_empty() {
        return Err(problems.iter().map(|f| Failure::bad_input(f.message.clone())).collect());
    }
    let errors = report.findings.iter().filter(|f| f.severity == Severity::Error).count();
    if errors > 0 {
        return Err(vec![Failure::refused(format!(
            "lint found {errors} error(s); apply would refuse without --force"
        ))]);
    }
    if let Some(Err(e)) = &report.check {
        return Err(vec![Failure::refused(format!("kernel check failed: {e}"))]);
    }
    Ok(Exit::Ok)
}

/// The committed policy transaction of this target (its accepts are replaced by an apply, so
/// `plan` shows their removal): the same record the agent's apply replaces. A state dir that
/// does not exist yet holds none.
fn previous_committed(global: &Global, target_id: (u64, u64)) -> Result<Option<PolicyUndo>, Vec<Failure>> {
    if !global.state_dir.exists() {
        return Ok(None);
    }
    let bad = |m: String| vec![Failure::bad_input(m)];
    let j = crate::journal::Journal::attach(&global.state_dir).map_err(|e| bad(e.to_string()))?;
    let records = j.list().map_err(|e| bad(e.to_string()))?;
    let Some(r) = records
        .into_iter()
        .rev()
        .find(|r| (r.target.dev, r.target.ino) == target_id && r.kind == crate::txn::Kind::Policy)
    else {
        return Ok(None);
    };
    if r.state != crate::txn::State::Committed {
        return Ok(None);
    }
    match crate::agent::engine::Undo::from_record(crate::txn::Kind::Policy, &r.undo) {
        Ok(crate::agent::engine::Undo::Policy(u)) => Ok(Some(*u)),
        Ok(_) => Ok(None),
        Err(e) => Err(vec![Failure::internal(format!("the committed transaction {}: {}", r.id, e.message))]),
    }
}

/// Runs inside the target's thread: the planning core `apply` uses
/// ([`policy_txn::prepare_with`]), every finding kept, and with `check` the same kernel check.
fn build_report(
    policy: &Policy,
    check: bool,
    facts: MachineFacts,
    ssh: Option<SshConn>,
    previous: Option<PolicyUndo>,
    target: String,
    initial_ns: bool,
) -> Result<Report, Vec<Failure>> {
    let refused = |e: &dyn std::fmt::Display| vec![Failure::refused(e.to_string())];
    let tag = Tag::preview();
    let req = PolicyRequest { policy: policy.clone(), tag: tag.clone(), force: false, ssh, previous };
    let prepared = policy_txn::prepare_with(&req, facts, PrepareMode::PLAN).map_err(|e| {
        let exit = e.exit();
        let lines: Vec<String> = policy_txn::chain_text(&e).lines().map(str::to_string).collect();
        lines.into_iter().map(|m| Failure::new(exit, m)).collect::<Vec<_>>()
    })?;
    let live = &prepared.live;
    tracing::info!(
        nft_tables = live.nft.tables.len(),
        iptables_dumps = live.iptables.len(),
        "read the live state of {target}"
    );
    let backend = prepared.backend;
    tracing::debug!(backend = backend.as_str(), "effective backend");
    let (current, desired) = match variant_of(backend) {
        None => {
            let current = live_backend::ctguard_table_text().map_err(|e| refused(&e))?;
            let t = table_for(policy, &tag);
            let desired = if t.is_empty() { String::new() } else { table_block(&t) };
            (lines(current.as_deref().unwrap_or("")), lines(&desired))
        }
        Some(v) => {
            let mut current = Vec::new();
            let mut desired = Vec::new();
            for fam in IpFamily::ALL {
                let v6 = fam == IpFamily::V6;
                if let Some(d) = live.iptables.iter().find(|d| d.variant == v && d.v6 == v6) {
                    let dump = iptables_save::parse(&d.text).map_err(|e| refused(&e))?;
                    for chain in [CHAIN_PRE, CHAIN_OUT] {
                        if let Some(c) = dump.chain(RAW_TABLE, chain) {
                            current.extend(c.rules.iter().map(|r| {
                                crate::model::names::normalize_tags(&format!("{}: {}", fam.tool_prefix(), r.line))
                            }));
                        }
                    }
                }
                let r = notrack_rules(policy, fam, &tag);
                desired.extend(r.rules.iter().map(|r| format!("{}: {}", fam.tool_prefix(), r.append_line())));
            }
            (current, desired)
        }
    };
    let removed = prepared.undo_record().removed_previous;
    let removals = removed.iter().map(removal_text).collect();
    let (gone, new) = accept_keys(&removed, &prepared.plan);
    let same_accepts = gone == new;
    let check = check.then(|| policy_txn::kernel_check(&prepared).map_err(|e| policy_txn::chain_text(&e)));
    if let Some(Err(e)) = &check {
        tracing::warn!("kernel check failed: {e}");
    }
    tracing::info!(insertions = prepared.plan.insertions.len(), findings = prepared.findings.len(), "planned");
    Ok(Report {
        target,
        initial_ns,
        backend,
        current,
        desired,
        plan: prepared.plan.clone(),
        removals,
        same_accepts,
        sysctls: prepared.sysctls.clone(),
        findings: prepared.findings.clone(),
        check,
    })
}

/// One accept of the previous transaction that apply removes, as the operator knows it.
fn removal_text(r: &Removed) -> String {
    match r {
        Removed::Nft { family, table, chain, text, .. } => format!("nft {family} {table} {chain}: {text}"),
        Removed::Iptables { variant, v6, table, line, .. } => {
            format!("{} {table}: {line}", crate::live::fw::IptVariant::from(*variant).tool(*v6, ""))
        }
    }
}

/// Non-empty lines, with every transaction tag read as `ctguard:preview`: a committed policy
/// compares equal to its rendering (so `changed` is false when nothing would change).
fn lines(s: &str) -> Vec<String> {
    s.lines().map(str::trim_end).filter(|l| !l.trim().is_empty()).map(crate::model::names::normalize_tags).collect()
}

/// The line diff of `show` and `plan` (linear space: [`crate::diff`]).
pub(crate) use crate::diff::diff_lines;

fn insertion_text(ins: &crate::render::planner::Insertion) -> String {
    let where_ = match &ins.position {
        Position::Before { handle: Some(h), rule, .. } => format!("before handle {h} `{rule}`"),
        Position::Before { index, rule, .. } => format!("at {index}, before `{rule}`"),
        Position::Append => "appended (the chain's policy drops)".into(),
    };
    let rule = match &ins.rule {
        RuleSpec::Nft(r) => r.clone(),
        RuleSpec::Iptables(specs) => {
            specs.iter().map(|s| crate::render::iptables::spec_to_line(s)).collect::<Vec<_>>().join(" ; ")
        }
    };
    format!("{} {where_}: {rule}", ins.chain)
}

fn report_text(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "target:  {}", r.target);
    let _ = writeln!(s, "backend: {}", r.backend.as_str());
    let objects =
        if variant_of(r.backend).is_some() { "iptables raw CTGUARD-PRE/CTGUARD-OUT" } else { "table inet ctguard" };
    if r.current == r.desired {
        let _ = writeln!(s, "\n{objects}: unchanged");
    } else {
        let _ = writeln!(s, "\n{objects}:");
        for l in diff_lines(&r.current, &r.desired) {
            let _ = writeln!(s, "  {l}");
        }
    }
    let _ = writeln!(s, "\naccept insertions (accept_untracked):");
    if r.plan.insertions.is_empty() && r.removals.is_empty() {
        let _ = writeln!(s, "  none needed");
    } else if r.same_accepts {
        let _ = writeln!(s, "  in place: the committed transaction's {} accept(s), unchanged", r.removals.len());
    } else {
        for rm in &r.removals {
            let _ = writeln!(s, "  - {rm} (the committed transaction's, re-planned)");
        }
        for ins in &r.plan.insertions {
            let _ = writeln!(s, "  + {}", insertion_text(ins));
        }
    }
    let _ = writeln!(s, "\nsysctl:");
    if r.sysctls.is_empty() {
        let _ = writeln!(s, "  none");
    }
    for c in &r.sysctls {
        let old = c.old.map_or("(missing)".to_string(), |v| v.to_string());
        match (&c.skipped, c.unchanged) {
            (Some(why), _) => {
                let _ = writeln!(s, "  {} = {old}: skipped ({why}); would be {}", c.key, c.new);
            }
            (None, true) => {
                let _ = writeln!(s, "  {} = {old} (unchanged)", c.key);
            }
            (None, false) => {
                let _ = writeln!(s, "  {}: {old} -> {}", c.key, c.new);
            }
        }
    }
    if !r.findings.is_empty() {
        let _ = writeln!(s, "\nlint:");
        for f in &r.findings {
            let _ = writeln!(s, "  {f}");
        }
    }
    if let Some(c) = &r.check {
        let _ = writeln!(
            s,
            "\nkernel check: {}",
            match c {
                Ok(()) => "ok".to_string(),
                Err(e) => format!("FAILED: {e}"),
            }
        );
    }
    let _ = writeln!(s, "\nchanged: {}", if r.changed() { "yes" } else { "no" });
    s
}

fn report_json(r: &Report) -> serde_json::Value {
    json!({
        "changed": r.changed(),
        "target": r.target,
        "initial_namespace": r.initial_ns,
        "backend": r.backend.as_str(),
        "objects": {
            "current": r.current,
            "desired": r.desired,
            "diff": diff_lines(&r.current, &r.desired),
        },
        "insertions": r.plan.insertions,
        "removals": r.removals,
        "accepts_unchanged": r.same_accepts,
        "sysctl": r.sysctls,
        "findings": r.findings,
        "errors": r.findings.iter().filter(|f| f.severity == Severity::Error).count(),
        "check": r.check.as_ref().map(|c| match c {
            Ok(()) => json!({"ok": true}),
            Err(e) => json!({"ok": false, "error": e}),
        }),
    })
}
