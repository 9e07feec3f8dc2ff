//! The lint (DESIGN §7): static findings about what a policy would do to the live ruleset.
//! Errors make `plan` exit 3 and `apply` refuse unless `--force`. Pure: it reads the planner's
//! result, the merged chains and the resolved sysctls.

use std::fmt;
use std::net::IpAddr;

use serde::Serialize;

use crate::live::fw::{ChainKind, Cond, FwHook, FwTables, Verdict};
use crate::model::{Policy, Prefix, Proto};
use crate::render::flow::{evaluate, flow_for, rule_matches, Direction, Flow, Tri};
use crate::render::planner::InsertionPlan;
use crate::render::sysctl::SysctlChange;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth knowing; does not refuse.
    Warning,
    /// Refuses `apply` unless `--force`; `plan` exits 3.
    Error,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Warning => "warning",
            Severity::Error => "error",
        })
    }
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Severity.
    pub severity: Severity,
    /// Stable short code (`blackhole`, `nat-bypass`, `ssh-lockout`, `invalid-drop`,
    /// `open-resolver`, `sysctl-skipped`).
    pub code: &'static str,
    /// The chain it is about (`nft inet host input`), if any.
    pub chain: Option<String>,
    /// The rule it is about, if any.
    pub rule: Option<String>,
    /// One line.
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} [{}]", self.severity, self.code)?;
        if let Some(c) = &self.chain {
            write!(f, " {c}")?;
        }
        if let Some(r) = &self.rule {
            write!(f, " (rule: {r})")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// The requester's SSH connection as far as it is known (DESIGN §4; `plan` uses
/// `SSH_CONNECTION`, the agent derives it from the process ancestry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SshConn {
    /// Client address.
    pub client: IpAddr,
    /// Server port (22 usually).
    pub server_port: u16,
}

impl SshConn {
    /// Parses `SSH_CONNECTION` (`client_ip client_port server_ip server_port`).
    pub fn from_env_value(v: &str) -> Option<SshConn> {
        let f: Vec<&str> = v.split_whitespace().collect();
        if f.len() != 4 {
            return None;
        }
        Some(SshConn { client: f[0].parse().ok()?, server_port: f[3].parse().ok()? })
    }
}

/// Everything the lint looks at.
pub struct LintInput<'a> {
    /// The candidate policy.
    pub policy: &'a Policy,
    /// The live chains, merged (`LiveState::chains`).
    pub tables: &'a FwTables,
    /// The planner's result for this policy.
    pub plan: &'a InsertionPlan,
    /// Resolved sysctls.
    pub sysctls: &'a [SysctlChange],
    /// The requester's SSH connection, if any.
    pub ssh: Option<SshConn>,
}

/// Runs every check; findings sorted errors first.
pub fn lint(input: &LintInput<'_>) -> Vec<Finding> {
    let mut out = Vec::new();
    blackholes(input, &mut out);
    nat_bypass(input, &mut out);
    ssh_lockout(input, &mut out);
    invalid_drop(input, &mut out);
    open_resolver(input, &mut out);
    for c in input.sysctls {
        if let Some(why) = &c.skipped {
            out.push(Finding {
                severity: Severity::Warning,
                code: "sysctl-skipped",
                chain: None,
                rule: None,
                message: format!("{} skipped: {why}", c.key),
            });
        }
    }
    out.sort_by_key(|f| std::cmp::Reverse(f.severity));
    // Per-family evaluations can report the same thing twice.
    let mut seen = std::collections::HashSet::new();
    out.retain(|f| seen.insert(f.to_string()));
    out
}

fn where_dropped(at: &crate::render::flow::DecidedAt) -> String {
    match at {
        crate::render::flow::DecidedAt::Rule(r) => format!("rule `{}`", r.text),
        crate::render::flow::DecidedAt::Policy => "the chain's drop policy".into(),
    }
}

fn blackholes(input: &LintInput<'_>, out: &mut Vec<Finding>) {
    for d in &input.plan.decisions {
        let entry = &input.policy.notrack[d.entry];
        if entry.accept_untracked {
            continue;
        }
        out.push(Finding {
            severity: Severity::Error,
            code: "blackhole",
            chain: Some(d.chain.label()),
            rule: None,
            message: format!(
                "notrack[{}] {} {:?}: accepted here while tracked, dropped once untracked by {}; NOTRACK would blackhole it (set accept_untracked = true)",
                d.entry,
                d.proto,
                d.direction,
                where_dropped(&d.untracked.at)
            ),
        });
    }
}

fn nat_bypass(input: &LintInput<'_>, out: &mut Vec<Finding>) {
    for (i, entry) in input.policy.notrack.iter().enumerate() {
        for &proto in &entry.protocols {
            let request = flow_for(entry, proto, Direction::Request, None, "new", false);
            let mut checks: Vec<(FwHook, &Flow, bool)> =
                vec![(FwHook::Prerouting, &request, true), (FwHook::Output, &request, true)];
            if !entry.local_only {
                checks.push((FwHook::Postrouting, &request, false));
            }
            for (hook, flow, dnat) in checks {
                for chain in input.tables.base_chains(ChainKind::Nat, hook) {
                    for rule in &chain.rules {
                        let hit = matches!(
                            (&rule.verdict, dnat),
                            (Verdict::Dnat | Verdict::Redirect, true) | (Verdict::Snat | Verdict::Masquerade, false)
                        );
                        if hit && rule_matches(rule, flow) != Tri::No {
                            out.push(Finding {
                                severity: Severity::Error,
                                code: "nat-bypass",
                                chain: Some(chain.label()),
                                rule: Some(rule.text.clone()),
                                message: format!(
                                    "notrack[{i}] {proto}: untracked packets skip NAT, so this {} stops working for the notracked flows",
                                    if dnat { "DNAT/redirect" } else { "SNAT/masquerade" }
                                ),
                            });
                        }
                    }
                }
            }
        }
    }
}

fn ssh_lockout(input: &LintInput<'_>, out: &mut Vec<Finding>) {
    let Some(ssh) = input.ssh else { return };
    let client = match ssh.client {
        IpAddr::V4(a) => Prefix::V4(a, 32),
        IpAddr::V6(a) => Prefix::V6(a, 128),
    };
    for (i, entry) in input.policy.notrack.iter().enumerate() {
        let covered = entry.has_port(Proto::Tcp, ssh.server_port)
            && (entry.sources.is_empty() || entry.sources.iter().any(|p| p.covers(&client)));
        if !covered || entry.accept_untracked {
            continue;
        }
        let flow = |ct: &str| Flow {
            proto: Proto::Tcp,
            dports: vec![crate::model::PortRange::single(ssh.server_port)],
            sports: Vec::new(),
            saddr: vec![client],
            daddr: Vec::new(),
            iif: Vec::new(),
            oif: Vec::new(),
            iif_not: Vec::new(),
            oif_not: Vec::new(),
            v6: Some(client.is_v6()),
            ct: ct.to_string(),
        };
        for chain in input.tables.base_chains(ChainKind::Filter, FwHook::Input) {
            let tracked = evaluate(input.tables, chain, &flow("established"));
            let untracked = evaluate(input.tables, chain, &flow("untracked"));
            if tracked.accepts_some() && !untracked.accept {
                out.push(Finding {
                    severity: Severity::Error,
                    code: "ssh-lockout",
                    chain: Some(chain.label()),
                    rule: None,
                    message: format!(
                        "notrack[{i}] covers your SSH connection ({} to port {}) and this chain drops it once untracked: you would be locked out",
                        ssh.client, ssh.server_port
                    ),
                });
            }
        }
    }
}

fn invalid_drop(input: &LintInput<'_>, out: &mut Vec<Finding>) {
    if input.policy.notrack.is_empty() {
        return;
    }
    for hook in [FwHook::Input, FwHook::Output] {
        for chain in input.tables.base_chains(ChainKind::Filter, hook) {
            for rule in &chain.rules {
                let drops_invalid = matches!(rule.verdict, Verdict::Drop | Verdict::Reject)
                    && rule.conds.iter().any(|c| matches!(c, Cond::CtState { neg: false, states } if states.iter().any(|s| s == "invalid")));
                if drops_invalid {
                    out.push(Finding {
                        severity: Severity::Warning,
                        code: "invalid-drop",
                        chain: Some(chain.label()),
                        rule: Some(rule.text.clone()),
                        message: "ICMP errors about notracked flows are INVALID, so this rule will now drop them (path MTU discovery for those flows breaks)".into(),
                    });
                }
            }
        }
    }
}

fn open_resolver(input: &LintInput<'_>, out: &mut Vec<Finding>) {
    for d in &input.plan.decisions {
        if !input.policy.notrack[d.entry].accept_untracked {
            continue;
        }
        if let Some(rule) = d.skips_restriction() {
            out.push(Finding {
                severity: Severity::Warning,
                code: "open-resolver",
                chain: Some(d.chain.label()),
                rule: Some(rule.text.clone()),
                message: format!(
                    "notrack[{}] {}: tracked traffic is accepted only under this rule's conditions, but the inserted untracked accept has no such restriction (restrict `sources`/`interfaces` to keep it)",
                    d.entry, d.proto
                ),
            });
        }
    }
}
