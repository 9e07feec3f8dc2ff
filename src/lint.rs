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
    lost_rules(input, &mut out);
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
            chain: Some(d.chain.clone()),
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
    for (i, entry) in input.policy.notrack.iter().enumerate().filter(|(_, e)| e.serves()) {
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

/// The requester's client address as a host prefix (/32 or /128).
fn client_prefix(client: IpAddr) -> Prefix {
    match client {
        IpAddr::V4(a) => Prefix::V4(a, 32),
        IpAddr::V6(a) => Prefix::V6(a, 128),
    }
}

/// The packets of the requester's SSH connection (DESIGN §4) in one direction and conntrack
/// state: [`Direction::Request`] is client → server port (the input hook),
/// [`Direction::Reply`] (or any other direction) is server port → client (the output hook).
/// TCP, the client's family only; a client address that is not a loopback address never
/// crosses `lo`, a loopback one crosses nothing else.
pub fn ssh_flow(ssh: SshConn, dir: Direction, ct: &str) -> Flow {
    let client = client_prefix(ssh.client);
    let port = vec![crate::model::PortRange::single(ssh.server_port)];
    let (lo, not_lo) = if ssh.client.is_loopback() {
        (vec!["lo".to_string()], Vec::new())
    } else {
        (Vec::new(), vec!["lo".to_string()])
    };
    let mut f = Flow {
        proto: Proto::Tcp,
        dports: Vec::new(),
        sports: Vec::new(),
        saddr: Vec::new(),
        daddr: Vec::new(),
        iif: Vec::new(),
        oif: Vec::new(),
        iif_not: Vec::new(),
        oif_not: Vec::new(),
        v6: Some(client.is_v6()),
        ct: ct.to_string(),
    };
    if dir == Direction::Request {
        f.dports = port;
        f.saddr = vec![client];
        f.iif = lo;
        f.iif_not = not_lo;
    } else {
        f.sports = port;
        f.daddr = vec![client];
        f.oif = lo;
        f.oif_not = not_lo;
    }
    f
}

/// The `ssh-lockout` check of a whole ruleset (a ruleset transaction's result, DESIGN §1/§7):
/// for every base filter chain of the client's family, on the input hook the connection's
/// packets in conntrack states `new` (a new connection must get in: it is how the change is
/// confirmed) and `established`, and on the output hook the replies (`established`). Each
/// chain that definitely drops one of them — decided by a rule or by its policy, with no rule
/// before that may accept part of it — is an error naming the chain and the rule. A "maybe"
/// (a condition static evaluation cannot decide) is no finding. Pure; sorted, deduplicated.
pub fn ssh_lockout_of_ruleset(tables: &FwTables, ssh: SshConn) -> Vec<Finding> {
    let v6 = ssh.client.is_ipv6();
    let checks = [
        (FwHook::Input, Direction::Request, "new", "a new SSH connection from you (how the change is confirmed)"),
        (FwHook::Input, Direction::Request, "established", "your SSH connection's packets"),
        (FwHook::Output, Direction::Reply, "established", "the replies to your SSH connection"),
    ];
    let mut out = Vec::new();
    for (hook, dir, ct, what) in checks {
        let flow = ssh_flow(ssh, dir, ct);
        for chain in tables.base_chains(ChainKind::Filter, hook) {
            let (has_v4, has_v6) = chain.owner.families();
            if !(if v6 { has_v6 } else { has_v4 }) {
                continue;
            }
            let outcome = evaluate(tables, chain, &flow);
            if outcome.accepts_some() {
                continue;
            }
            let rule = match &outcome.at {
                crate::render::flow::DecidedAt::Rule(r) => Some(r.text.clone()),
                crate::render::flow::DecidedAt::Policy => None,
            };
            out.push(Finding {
                severity: Severity::Error,
                code: "ssh-lockout",
                chain: Some(chain.label()),
                rule,
                message: format!(
                    "the ruleset drops {what} ({} port {}, ct state {ct}) at {}: you would be locked out",
                    ssh.client,
                    ssh.server_port,
                    where_dropped(&outcome.at)
                ),
            });
        }
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|f| seen.insert(f.to_string()));
    out
}

fn ssh_lockout(input: &LintInput<'_>, out: &mut Vec<Finding>) {
    let Some(ssh) = input.ssh else { return };
    let client = client_prefix(ssh.client);
    for (i, entry) in input.policy.notrack.iter().enumerate() {
        let covered = entry.serves()
            && entry.has_port(Proto::Tcp, ssh.server_port)
            && (entry.sources.is_empty() || entry.sources.iter().any(|p| p.covers(&client)));
        if !covered || entry.accept_untracked {
            continue;
        }
        let flow = |ct: &str| ssh_flow(ssh, Direction::Request, ct);
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
                    && rule.conds.iter().any(
                        |c| matches!(c, Cond::CtState { neg: false, states } if states.iter().any(|s| s == "invalid")),
                    );
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
    // An insertion must never accept what the ruleset refused (DESIGN §6): where the tracked
    // flow is accepted only under a condition the inserted accept cannot repeat, the service
    // would become open to more clients than before (an open resolver).
    for u in &input.plan.uncarried {
        if !input.policy.notrack[u.entry].accept_untracked {
            continue;
        }
        out.push(Finding {
            severity: Severity::Error,
            code: "open-resolver",
            chain: Some(u.chain.clone()),
            rule: Some(u.rule.clone()),
            message: format!(
                "notrack[{}] {}: {}; the inserted untracked accept would widen access; restrict `sources`/`interfaces`/`ports` the same way, or --force",
                u.entry, u.proto, u.why
            ),
        });
    }
}

/// Rules that stop applying once the flows are notracked: a lost drop widens access (error
/// `widens-access`), a lost rate limit, log, mark or counter is a warning (`lost-effect`).
fn lost_rules(input: &LintInput<'_>, out: &mut Vec<Finding>) {
    for l in &input.plan.lost {
        let (severity, code) =
            if l.widens { (Severity::Error, "widens-access") } else { (Severity::Warning, "lost-effect") };
        out.push(Finding {
            severity,
            code,
            chain: Some(l.rule_chain.clone()),
            rule: Some(l.rule.clone()),
            message: format!("notrack[{}] {} {:?}: this rule {}", l.entry, l.proto, l.direction, l.why)
                + if l.widens { "; access would widen (--force to accept)" } else { "" },
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live::{iptables_fw, iptables_save, nft_json, IptDump, LiveState};

    /// `nft -j list ruleset` (nft 1.0.6) of a stateful host firewall that lets SSH in.
    const STATEFUL_JSON: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "inet", "name": "host", "handle": 1}}, {"chain": {"family": "inet", "table": "host", "name": "input", "handle": 1, "type": "filter", "hook": "input", "prio": 0, "policy": "drop"}}, {"chain": {"family": "inet", "table": "host", "name": "output", "handle": 2, "type": "filter", "hook": "output", "prio": 0, "policy": "accept"}}, {"rule": {"family": "inet", "table": "host", "chain": "input", "handle": 3, "expr": [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}, {"accept": null}]}}, {"rule": {"family": "inet", "table": "host", "chain": "input", "handle": 4, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iif"}}, "right": "lo"}}, {"accept": null}]}}, {"rule": {"family": "inet", "table": "host", "chain": "input", "handle": 5, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 22}}, {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}}, {"accept": null}]}}, {"rule": {"family": "inet", "table": "host", "chain": "input", "handle": 6, "expr": [{"reject": {"type": "icmpx", "expr": "port-unreachable"}}]}}]}"#;

    /// Established traffic and loopback only, policy drop: a new SSH connection never gets in.
    const NO_NEW_JSON: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "inet", "name": "lockout", "handle": 1}}, {"chain": {"family": "inet", "table": "lockout", "name": "input", "handle": 1, "type": "filter", "hook": "input", "prio": 0, "policy": "drop"}}, {"rule": {"family": "inet", "table": "lockout", "chain": "input", "handle": 2, "expr": [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}, {"accept": null}]}}, {"rule": {"family": "inet", "table": "lockout", "chain": "input", "handle": 3, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "lo"}}, {"accept": null}]}}]}"#;

    fn nft(json: &str) -> FwTables {
        LiveState { nft: nft_json::parse(json).expect("nft json"), iptables: Vec::new() }.chains()
    }

    fn ipt(text: &str, v6: bool) -> FwTables {
        let dump = iptables_save::parse(text).expect("save");
        let fw = iptables_fw::convert(&dump, crate::live::fw::IptVariant::Nft, v6);
        LiveState {
            nft: Default::default(),
            iptables: vec![IptDump { variant: crate::live::fw::IptVariant::Nft, v6, text: text.into(), fw }],
        }
        .chains()
    }

    fn conn(s: &str) -> SshConn {
        SshConn { client: s.parse().expect("address"), server_port: 22 }
    }

    #[test]
    fn stateful_host_lets_ssh_in() {
        assert_eq!(ssh_lockout_of_ruleset(&nft(STATEFUL_JSON), conn("198.18.0.2")), Vec::new());
    }

    #[test]
    fn drop_policy_without_ssh_accept_is_a_lockout() {
        let f = ssh_lockout_of_ruleset(&nft(NO_NEW_JSON), conn("198.18.0.2"));
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].severity, Severity::Error);
        assert_eq!(f[0].code, "ssh-lockout");
        assert_eq!(f[0].chain.as_deref(), Some("nft inet lockout input"));
        assert_eq!(f[0].rule, None);
        assert!(f[0].message.contains("ct state new") && f[0].message.contains("drop policy"), "{}", f[0]);
        // An inet table filters IPv6 clients the same way.
        assert_eq!(ssh_lockout_of_ruleset(&nft(NO_NEW_JSON), conn("2001:db8::2")).len(), 1);
    }

    #[test]
    fn loopback_client_is_not_locked_out_by_an_lo_accept() {
        assert_eq!(ssh_lockout_of_ruleset(&nft(NO_NEW_JSON), conn("127.0.0.1")), Vec::new());
    }

    #[test]
    fn iptables_input_drop_without_port_22() {
        let text = "*filter\n:INPUT DROP [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n-A INPUT -i lo -j ACCEPT\n-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n-A INPUT -p tcp -m tcp --dport 80 -j ACCEPT\nCOMMIT\n";
        let f = ssh_lockout_of_ruleset(&ipt(text, false), conn("198.18.0.2"));
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].chain.as_deref(), Some("iptables-nft filter INPUT"));
        // An IPv6 client is not filtered by an IPv4 table.
        assert_eq!(ssh_lockout_of_ruleset(&ipt(text, false), conn("2001:db8::2")), Vec::new());
        let ok = text.replace("--dport 80", "--dport 22");
        assert_eq!(ssh_lockout_of_ruleset(&ipt(&ok, false), conn("198.18.0.2")), Vec::new());
    }

    #[test]
    fn explicit_drop_rule_and_output_are_named() {
        let text = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n-A INPUT -s 198.18.0.0/24 -j DROP\n-A OUTPUT -p tcp -m tcp --sport 22 -j REJECT\nCOMMIT\n";
        let f = ssh_lockout_of_ruleset(&ipt(text, false), conn("198.18.0.2"));
        let rules: Vec<(Option<&str>, Option<&str>)> =
            f.iter().map(|f| (f.chain.as_deref(), f.rule.as_deref())).collect();
        assert!(
            rules.contains(&(Some("iptables-nft filter INPUT"), Some("-A INPUT -s 198.18.0.0/24 -j DROP"))),
            "{f:?}"
        );
        assert!(
            rules
                .iter()
                .any(|(c, r)| *c == Some("iptables-nft filter OUTPUT") && r.is_some_and(|r| r.contains("--sport 22"))),
            "{f:?}"
        );
        // Another client is not affected.
        assert_eq!(
            ssh_lockout_of_ruleset(&ipt(text, false), conn("203.0.113.9"))
                .iter()
                .filter(|f| f.chain.as_deref() == Some("iptables-nft filter INPUT"))
                .count(),
            0
        );
    }

    #[test]
    fn a_maybe_is_no_finding() {
        // An ipset match is opaque: the client may be in it.
        let text = "*filter\n:INPUT DROP [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n-A INPUT -m set --match-set admins src -j ACCEPT\nCOMMIT\n";
        assert_eq!(ssh_lockout_of_ruleset(&ipt(text, false), conn("198.18.0.2")), Vec::new());
    }
}
