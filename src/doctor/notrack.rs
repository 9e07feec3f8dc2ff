//! Broken NOTRACK setups (pure): every NOTRACK rule of the live ruleset — nft `notrack`
//! statements in any table, iptables `-j CT --notrack` / `-j NOTRACK` of both variants,
//! ctguard's own or hand-made — turned into the flow it notracks, and the filter chains
//! evaluated for the UNTRACKED packets of that flow with the planner's evaluator
//! (`crate::render::flow::evaluate`) and the planner's blackhole criterion
//! (`crate::render::planner::Decision::blackholes`: accepted while tracked, dropped once
//! untracked). Findings:
//!
//! - **blackhole**: a chain drops the untracked packets of a hand-made NOTRACK rule, naming the
//!   NOTRACK rule and the dropping rule, with the accept that fixes it;
//! - **untracked_open**: a NOTRACK rule that does not restrict the destination port (seed 002's
//!   `PREROUTING -p udp --sport 53 -j NOTRACK`) and an untracked accept that takes all of it
//!   (`-m state --state UNTRACKED -j ACCEPT`): every local port is reachable from that source
//!   port;
//! - **ctguard_degraded**: ctguard's own NOTRACK objects are there but the accepts its policy
//!   inserted are gone (a firewall reload): re-apply, `ctguard status`.
//!
//! The planner's views describe server-side flows of a policy entry (requests by destination
//! port in, replies by source port out); a hand-made rule may notrack by source port in
//! (replies of this host's own queries), so each rule's own direction is evaluated here with
//! the same evaluator instead of through a synthetic policy entry.

use std::collections::HashSet;

use serde::Serialize;
use serde_json::Value;

use super::flows::Side;
use crate::backend::nft_read::NotrackRules;
use crate::live::fw::{ChainKind, Cond, FwChain, FwHook, FwRule, FwTables, IptVariant, Owner, Verdict};
use crate::live::iptables_save::{self, RuleView};
use crate::live::{iptables_fw, nft_json, IptDump, LiveState};
use crate::model::{PortRange, Prefix, Proto};
use crate::render::flow::{evaluate, DecidedAt, Direction, Flow, Outcome};
use crate::render::planner::Decision;

/// How deep jumps from a raw base chain are followed.
const MAX_DEPTH: usize = 8;

/// The live ruleset as the doctor reads it: the merged chains (`LiveState::chains`) and which
/// nft rules are `notrack` statements (the neutral model has no place for that statement).
#[derive(Debug, Clone, Default)]
pub struct Firewall {
    /// Every chain, each once.
    pub tables: FwTables,
    /// (family, table, chain, handle) of every nft rule with a `notrack` statement.
    pub nft_notrack: NotrackRules,
    /// True when `table inet ctguard` exists.
    pub ctguard_table: bool,
}

impl Firewall {
    /// From the live state as read (over netlink: `crate::backend::nft_read`) and the keys of
    /// its nft rules with a `notrack` statement (`nft_read::read_skipping_notrack`). Takes the
    /// state by value: its chains are moved, not copied (the doctor's peak memory is the
    /// ruleset's size once). The chains of the tables iptables-nft owns come from its dumps,
    /// as in `LiveState::chains`.
    pub fn from_live(live: LiveState, nft_notrack: NotrackRules) -> Firewall {
        let owned = crate::backend::live::ipt_nft_tables(&live.iptables);
        let ipt = live.iptables.into_iter().flat_map(|d| d.fw.chains).collect();
        Firewall::from_parts(live.nft, &owned, ipt, nft_notrack)
    }

    /// [`Firewall::from_live`] from its parts: the nft ruleset, the tables iptables-nft owns
    /// (their nft chains are left out) and the chains of the iptables dumps, appended after
    /// the nft ones. [`Firewall::iptables_chains`] takes the latter back.
    pub fn from_parts(
        nft: crate::live::nft_json::NftRuleset,
        owned: &[(String, String)],
        iptables: Vec<FwChain>,
        nft_notrack: NotrackRules,
    ) -> Firewall {
        let ctguard_table = nft.has_table("inet", crate::render::nft_ir::TABLE_NAME);
        let owned: HashSet<&(String, String)> = owned.iter().collect();
        let mut tables = FwTables::default();
        for c in nft.fw.chains {
            if let Owner::Nft { family, table } = &c.owner {
                if owned.contains(&(family.clone(), table.clone())) {
                    continue;
                }
            }
            tables.chains.push(c);
        }
        tables.chains.extend(iptables);
        Firewall { tables, nft_notrack, ctguard_table }
    }

    /// Takes the iptables chains back out (they follow the nft ones), leaving the nft part.
    pub fn iptables_chains(&mut self) -> Vec<FwChain> {
        let first = self.tables.chains.iter().position(|c| matches!(c.owner, Owner::Iptables { .. }));
        first.map(|i| self.tables.chains.split_off(i)).unwrap_or_default()
    }

    /// True when any chain holds a NOTRACK rule (reachable or not). Pure.
    pub fn any_notrack_rule(&self) -> bool {
        self.tables.chains.iter().any(|c| c.rules.iter().any(|r| self.is_notrack(c, r)))
    }

    /// From `nft -j list ruleset` (if nft exists; the `CTGUARD_NFT_READ=json` fallback) and the
    /// iptables dumps as read.
    pub fn from_json(nft: Option<&str>, iptables: Vec<IptDump>) -> Result<Firewall, String> {
        let mut nft_model = crate::live::nft_json::NftRuleset::default();
        let mut nft_notrack = NotrackRules::new();
        if let Some(text) = nft {
            nft_model = nft_json::parse(text).map_err(|e| e.to_string())?;
            if !text.trim().is_empty() {
                let doc: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
                nft_notrack = json_notrack_rules(&doc);
            }
        }
        Ok(Firewall::from_live(LiveState { nft: nft_model, iptables }, nft_notrack))
    }

    /// From `nft -j list ruleset` (if nft exists) and the iptables dumps (variant, IPv6, text).
    pub fn parse(nft: Option<&str>, dumps: &[(IptVariant, bool, String)]) -> Result<Firewall, String> {
        let mut iptables = Vec::new();
        for (variant, v6, text) in dumps {
            let dump = iptables_save::parse(text).map_err(|e| format!("{}: {e}", variant.tool(*v6, "-save")))?;
            iptables.push(IptDump {
                variant: *variant,
                v6: *v6,
                fw: iptables_fw::convert(&dump, *variant, *v6),
                text: String::new(),
            });
        }
        Firewall::from_json(nft, iptables)
    }

    fn is_notrack(&self, chain: &FwChain, rule: &FwRule) -> bool {
        match &chain.owner {
            Owner::Nft { family, table } => rule
                .handle
                .is_some_and(|h| self.nft_notrack.contains(&(family.clone(), table.clone(), chain.name.clone(), h))),
            Owner::Iptables { .. } => iptables_rule_notracks(rule),
        }
    }

    /// True when ctguard's objects are present: `table inet ctguard` or `CTGUARD-*` chains.
    pub fn ctguard_present(&self) -> bool {
        self.ctguard_table || self.tables.chains.iter().any(|c| c.name.starts_with("CTGUARD-"))
    }
}

/// The rules of nft's JSON listing (`nft -j list ruleset`, parsed) that carry a `notrack`
/// statement, by (family, table, chain, handle): the oracle of
/// `nft_read::notrack_rules`. Pure.
pub fn json_notrack_rules(doc: &Value) -> NotrackRules {
    let mut out = NotrackRules::new();
    for item in doc.get("nftables").and_then(Value::as_array).into_iter().flatten() {
        let Some(r) = item.get("rule") else { continue };
        let has = r.get("expr").and_then(Value::as_array).is_some_and(|e| e.iter().any(|x| x.get("notrack").is_some()));
        if let (true, Some(h)) = (has, r.get("handle").and_then(Value::as_u64)) {
            let s = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
            out.insert((s("family"), s("table"), s("chain"), h));
        }
    }
    out
}

/// A rule, for findings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleRef {
    /// `nft inet raw_handmade prerouting`, `iptables-legacy raw PREROUTING`, …
    pub chain: String,
    /// The rule's text (nft) or save line (iptables); `policy drop` for a chain's policy.
    pub rule: String,
}

/// One NOTRACK rule and the flow it notracks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotrackFlow {
    /// Where it is.
    pub at: RuleRef,
    /// The owner of its table.
    pub owner: Owner,
    /// prerouting or output.
    pub hook: FwHook,
    /// ctguard's own (tagged, or in ctguard's table or chains).
    pub ctguard: bool,
    /// Protocols (both when the rule names none of TCP/UDP).
    pub protos: Vec<Proto>,
    /// Destination ports (empty: any).
    pub dports: Vec<PortRange>,
    /// Source ports (empty: any).
    pub sports: Vec<PortRange>,
    /// Source prefixes (empty: any).
    pub saddr: Vec<Prefix>,
    /// Destination prefixes (empty: any).
    pub daddr: Vec<Prefix>,
    /// Input interfaces (empty: any).
    pub iif: Vec<String>,
    /// Output interfaces (empty: any).
    pub oif: Vec<String>,
    /// One family only.
    pub v6: Option<bool>,
    /// The side of the flows: `server` (requests in by destination port, replies out by source
    /// port, loopback requests), `client` (this host's queries out by destination port, their
    /// replies in by source port), `unknown` (no port).
    pub side: Side,
}

impl NotrackFlow {
    fn from_conds(at: RuleRef, owner: Owner, hook: FwHook, ctguard: bool, conds: &[Cond]) -> Option<NotrackFlow> {
        let mut f = NotrackFlow {
            at,
            owner,
            hook,
            ctguard,
            protos: Vec::new(),
            dports: Vec::new(),
            sports: Vec::new(),
            saddr: Vec::new(),
            daddr: Vec::new(),
            iif: Vec::new(),
            oif: Vec::new(),
            v6: None,
            side: Side::Unknown,
        };
        let mut other_proto = false;
        for c in conds {
            // A named set stands for its elements as read.
            let c = match c {
                Cond::Named { inner, .. } => inner.as_ref(),
                c => c,
            };
            match c {
                Cond::Proto { neg: false, protos } => {
                    let p: Vec<Proto> = protos
                        .iter()
                        .filter_map(|n| match n {
                            6 => Some(Proto::Tcp),
                            17 => Some(Proto::Udp),
                            _ => None,
                        })
                        .collect();
                    other_proto |= p.is_empty();
                    f.protos = p;
                }
                Cond::Dport { neg: false, ranges } => f.dports = ranges.clone(),
                Cond::Sport { neg: false, ranges } => f.sports = ranges.clone(),
                Cond::Saddr { neg: false, prefixes } => f.saddr = prefixes.clone(),
                Cond::Daddr { neg: false, prefixes } => f.daddr = prefixes.clone(),
                Cond::Iif { neg: false, names } => f.iif = names.clone(),
                Cond::Oif { neg: false, names } => f.oif = names.clone(),
                Cond::Family { v6 } => f.v6 = Some(*v6),
                _ => {}
            }
        }
        if other_proto {
            return None;
        }
        if f.protos.is_empty() {
            f.protos = vec![Proto::Tcp, Proto::Udp];
        }
        let lo_only = !f.oif.is_empty() && f.oif.iter().all(|o| o == "lo");
        f.side = match (hook, f.dports.is_empty(), f.sports.is_empty()) {
            (FwHook::Prerouting, false, _) => Side::Server,
            (FwHook::Prerouting, true, false) => Side::Client,
            (FwHook::Output, true, false) => Side::Server,
            (FwHook::Output, false, _) if lo_only => Side::Server,
            (FwHook::Output, false, _) => Side::Client,
            _ => Side::Unknown,
        };
        Some(f)
    }

    /// `udp dport 53`, `udp sport 53 from 192.0.2.1`, …
    pub fn describe(&self) -> String {
        let protos: Vec<&str> = self.protos.iter().map(|p| p.as_str()).collect();
        let mut s = protos.join("+");
        if !self.dports.is_empty() {
            s.push_str(&format!(" dport {}", ports_text(&self.dports)));
        }
        if !self.sports.is_empty() {
            s.push_str(&format!(" sport {}", ports_text(&self.sports)));
        }
        if !self.saddr.is_empty() {
            s.push_str(&format!(" from {}", list(&self.saddr)));
        }
        if !self.daddr.is_empty() {
            s.push_str(&format!(" to {}", list(&self.daddr)));
        }
        if !self.iif.is_empty() {
            s.push_str(&format!(" in {}", self.iif.join(",")));
        }
        if !self.oif.is_empty() {
            s.push_str(&format!(" out {}", self.oif.join(",")));
        }
        s
    }

    /// `in` (prerouting) or `out` (output), for findings.
    pub fn hook_word(&self) -> &'static str {
        if self.hook == FwHook::Prerouting {
            "in"
        } else {
            "out"
        }
    }

    /// The report's view of the rule.
    pub fn info(&self) -> super::report::NotrackRuleInfo {
        let client_out = self.hook == FwHook::Output && self.side == Side::Client;
        let server_out = self.hook == FwHook::Output && self.side == Side::Server;
        super::report::NotrackRuleInfo {
            notrack: self.at.clone(),
            flow: self.describe(),
            direction: self.side,
            ctguard: self.ctguard,
            hook: self.hook,
            protocols: self.protos.clone(),
            ports: self.service_ports().to_vec(),
            peers: if client_out || server_out { self.daddr.clone() } else { self.saddr.clone() },
            interfaces: if self.hook == FwHook::Prerouting { self.iif.clone() } else { self.oif.clone() },
        }
    }

    /// The ports that name the service (destination ports server-side in, source ports
    /// server-side out; the upstream's port client-side).
    pub fn service_ports(&self) -> &[PortRange] {
        match (self.hook, self.side) {
            (FwHook::Prerouting, Side::Server) | (FwHook::Output, Side::Client) => &self.dports,
            (FwHook::Output, Side::Server) if !self.dports.is_empty() => &self.dports,
            _ => &self.sports,
        }
    }
}

fn ports_text(p: &[PortRange]) -> String {
    list(p)
}

fn list<T: std::fmt::Display>(v: &[T]) -> String {
    v.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

fn is_ctguard(chain: &FwChain, rule: &FwRule) -> bool {
    rule.comment.as_deref().is_some_and(crate::model::names::Tag::is_ctguard_comment)
        || chain.name.starts_with("CTGUARD-")
        || matches!(&chain.owner, Owner::Nft { family, table } if family == "inet" && table == crate::render::nft_ir::TABLE_NAME)
}

/// Every NOTRACK rule reachable from a prerouting or output base chain (jumps followed, the
/// jump rules' conditions added).
pub fn notrack_flows(fw: &Firewall) -> Vec<NotrackFlow> {
    let mut out = Vec::new();
    for chain in &fw.tables.chains {
        let Some(hook @ (FwHook::Prerouting | FwHook::Output)) = chain.hook else { continue };
        walk(fw, chain, hook, &[], 0, &mut out);
    }
    out
}

/// True when `rule`, an iptables rule (its [`FwRule::text`] the save's line), is `-j NOTRACK`
/// or `-j CT --notrack`. Pure.
pub fn iptables_rule_notracks(rule: &FwRule) -> bool {
    // Most rules say neither (the doctor asks of every rule it streams); the tokens decide.
    if !rule.text.contains("NOTRACK") && !rule.text.contains("--notrack") {
        return false;
    }
    let Ok(tokens) = iptables_save::tokenize(&rule.text) else { return false };
    let args =
        if tokens.first().map(String::as_str) == Some("-A") { &tokens[2.min(tokens.len())..] } else { &tokens[..] };
    let view = RuleView::from_args(args);
    view.target.is_some_and(|t| t.name == "NOTRACK" || (t.name == "CT" && t.args.iter().any(|a| a == "--notrack")))
}

/// The nft chains [`check`] may evaluate: every filter base chain at input or output, and the
/// chains their rules (as held in `fw`) jump or go to, transitively. Pure.
pub fn filter_chains_reached(fw: &Firewall) -> HashSet<(String, String, String)> {
    chains_reached(fw, |o| matches!(o, Owner::Nft { .. }).then(|| o.nf_table()).flatten())
}

/// [`filter_chains_reached`] for iptables-nft's chains: its filter tables' INPUT and OUTPUT and
/// the chains their rules (as held in `fw`) jump or go to, keyed by nf_tables family (`ip`,
/// `ip6`), table and chain. Pure.
pub fn ipt_nft_filter_chains_reached(fw: &Firewall) -> HashSet<(String, String, String)> {
    chains_reached(fw, |o| {
        matches!(o, Owner::Iptables { variant: IptVariant::Nft, .. }).then(|| o.nf_table()).flatten()
    })
}

/// [`filter_chains_reached`] for iptables-legacy's chains: (IPv6, table, chain). Pure.
pub fn legacy_filter_chains_reached(fw: &Firewall) -> HashSet<(bool, String, String)> {
    chains_reached(fw, |o| match o {
        Owner::Iptables { variant: IptVariant::Legacy, v6, table } => {
            Some((if *v6 { "ip6" } else { "ip" }.to_string(), table.clone()))
        }
        _ => None,
    })
    .into_iter()
    .map(|(f, t, c)| (f == "ip6", t, c))
    .collect()
}

/// The filter base chains at input or output whose owner `key` names, and the chains they
/// reach by jumps and gotos, transitively: (key, chain name).
fn chains_reached(
    fw: &Firewall,
    key: impl Fn(&Owner) -> Option<(String, String)>,
) -> HashSet<(String, String, String)> {
    let mut seen: HashSet<(String, String, String)> = HashSet::new();
    let mut todo: Vec<&FwChain> = fw
        .tables
        .chains
        .iter()
        .filter(|c| c.kind == ChainKind::Filter && matches!(c.hook, Some(FwHook::Input | FwHook::Output)))
        .collect();
    while let Some(c) = todo.pop() {
        let Some((family, table)) = key(&c.owner) else { continue };
        if !seen.insert((family, table, c.name.clone())) {
            continue;
        }
        for r in &c.rules {
            if let Verdict::Jump(name) | Verdict::Goto(name) = &r.verdict {
                if let Some(sub) = fw.tables.find(&c.owner, name) {
                    todo.push(sub);
                }
            }
        }
    }
    seen
}

/// Every flow [`check`] may evaluate for `flows` (both families, tracked and untracked, each
/// leg): a rule that matches none of them (`rule_matches` says no) changes none of its
/// outcomes, so a reader may leave it out. Pure.
pub fn evaluated_flows(flows: &[NotrackFlow]) -> Vec<Flow> {
    let mut out = Vec::new();
    for n in flows {
        for &proto in &n.protos {
            for (_, via_lo) in legs(n) {
                for v6 in [false, true] {
                    if n.v6.is_some_and(|x| x != v6) {
                        continue;
                    }
                    for ct in [tracked_state(n), "untracked"] {
                        out.push(flow_at(n, proto, v6, ct, via_lo));
                    }
                }
            }
        }
    }
    out
}

/// The state the packets of `n` have while tracked: requests are new, replies established.
fn tracked_state(n: &NotrackFlow) -> &'static str {
    match n.side {
        Side::Client if n.hook == FwHook::Prerouting => "established",
        Side::Server if n.hook == FwHook::Output && n.dports.is_empty() => "established",
        _ => "new",
    }
}

/// The filter hooks the untracked packets of `n` pass (`true`: the loopback leg).
fn legs(n: &NotrackFlow) -> Vec<(FwHook, bool)> {
    let mut legs: Vec<(FwHook, bool)> = Vec::new();
    match n.hook {
        FwHook::Prerouting => legs.push((FwHook::Input, false)),
        _ => {
            legs.push((FwHook::Output, false));
            // The loopback leg: the same untracked packets arrive again at input on `lo`
            // (a local client of a local service); not for rules restricted to addresses,
            // which name remote peers.
            let lo = n.oif.is_empty() || n.oif.iter().any(|o| o == "lo");
            if lo && n.saddr.is_empty() && n.daddr.is_empty() {
                legs.push((FwHook::Input, true));
            }
        }
    }
    legs
}

fn walk(fw: &Firewall, chain: &FwChain, hook: FwHook, prefix: &[Cond], depth: usize, out: &mut Vec<NotrackFlow>) {
    for rule in &chain.rules {
        let mut conds = prefix.to_vec();
        conds.extend(rule.conds.iter().cloned());
        if fw.is_notrack(chain, rule) {
            let at = RuleRef { chain: chain.label(), rule: rule.text.clone() };
            if let Some(f) = NotrackFlow::from_conds(at, chain.owner.clone(), hook, is_ctguard(chain, rule), &conds) {
                out.push(f);
            }
        }
        if let Verdict::Jump(name) | Verdict::Goto(name) = &rule.verdict {
            if let (Some(sub), true) = (fw.tables.find(&chain.owner, name), depth < MAX_DEPTH) {
                walk(fw, sub, hook, &conds, depth + 1, out);
            }
        }
    }
}

/// A finding about one NOTRACK rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// The untracked packets are dropped where the tracked ones are accepted.
    Blackhole {
        /// The NOTRACK rule.
        notrack: NotrackFlow,
        /// The protocol.
        proto: Proto,
        /// The filter chain.
        chain: String,
        /// The rule that drops them (or `policy drop`).
        dropped_by: RuleRef,
        /// The accept that fixes it, as a command.
        fix_command: String,
    },
    /// Every local port is reachable from the NOTRACK rule's flow.
    Open {
        /// The NOTRACK rule.
        notrack: NotrackFlow,
        /// The protocol.
        proto: Proto,
        /// The rule that accepts the untracked packets whatever their destination port.
        accepted_by: RuleRef,
    },
}

/// The untracked flow of `n` at a filter hook (`via_lo`: the loopback leg of an output rule,
/// seen again at input).
fn flow_at(n: &NotrackFlow, proto: Proto, v6: bool, ct: &str, via_lo: bool) -> Flow {
    let mut f = Flow {
        proto,
        dports: n.dports.clone(),
        sports: n.sports.clone(),
        saddr: n.saddr.iter().filter(|p| p.is_v6() == v6).copied().collect(),
        daddr: n.daddr.iter().filter(|p| p.is_v6() == v6).copied().collect(),
        iif: Vec::new(),
        oif: Vec::new(),
        iif_not: Vec::new(),
        oif_not: Vec::new(),
        v6: Some(v6),
        ct: ct.to_string(),
    };
    match (n.hook, via_lo) {
        (FwHook::Prerouting, _) => {
            f.iif = n.iif.clone();
            if f.iif.is_empty() {
                // Loopback packets are classified at output: prerouting NOTRACK does not see them.
                f.iif_not = vec!["lo".to_string()];
            }
        }
        (_, false) => f.oif = n.oif.clone(),
        (_, true) => f.iif = vec!["lo".to_string()],
    }
    f
}

fn rule_ref(chain: &FwChain, o: &Outcome) -> RuleRef {
    match &o.at {
        DecidedAt::Rule(r) => RuleRef { chain: chain.label(), rule: r.text.clone() },
        DecidedAt::Policy => RuleRef { chain: chain.label(), rule: "the chain's policy (drop)".to_string() },
    }
}

/// Evaluates every NOTRACK rule against the filter chains.
pub fn check(fw: &Firewall, flows: &[NotrackFlow]) -> Vec<Finding> {
    let mut out: Vec<Finding> = Vec::new();
    for n in flows {
        let tracked = tracked_state(n);
        let legs = legs(n);
        for &proto in &n.protos {
            for &(hook, via_lo) in &legs {
                for chain in fw.tables.base_chains(ChainKind::Filter, hook) {
                    let (has4, has6) = chain.owner.families();
                    for (present, v6) in [(has4, false), (has6, true)] {
                        if !present || n.v6.is_some_and(|x| x != v6) {
                            continue;
                        }
                        if !n.saddr.is_empty() && !n.saddr.iter().any(|p| p.is_v6() == v6) {
                            continue;
                        }
                        let t = evaluate(&fw.tables, chain, &flow_at(n, proto, v6, tracked, via_lo));
                        let u = evaluate(&fw.tables, chain, &flow_at(n, proto, v6, "untracked", via_lo));
                        let d = Decision {
                            chain: chain.label(),
                            entry: 0,
                            proto,
                            direction: Direction::Request,
                            v6: Some(v6),
                            tracked: t,
                            untracked: u.clone(),
                        };
                        if d.blackholes() {
                            let dropped_by = rule_ref(chain, &u);
                            let dup = out.iter().any(|f| matches!(f, Finding::Blackhole { notrack, proto: p, chain: c, .. } if notrack == n && *p == proto && *c == chain.label()));
                            if !dup {
                                out.push(Finding::Blackhole {
                                    notrack: n.clone(),
                                    proto,
                                    chain: chain.label(),
                                    fix_command: fix_command(chain, &u, n, proto, v6, via_lo),
                                    dropped_by,
                                });
                            }
                        } else if u.accept
                            && hook == FwHook::Input
                            && n.hook == FwHook::Prerouting
                            && n.dports.is_empty()
                        {
                            let dup = out.iter().any(
                                |f| matches!(f, Finding::Open { notrack, proto: p, .. } if notrack == n && *p == proto),
                            );
                            if !dup {
                                out.push(Finding::Open { notrack: n.clone(), proto, accepted_by: rule_ref(chain, &u) });
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// The command that inserts the missing accept just before the dropping rule.
fn fix_command(chain: &FwChain, u: &Outcome, n: &NotrackFlow, proto: Proto, v6: bool, via_lo: bool) -> String {
    let ports = |p: &[PortRange]| {
        if p.len() == 1 {
            p[0].to_string()
        } else {
            format!("{{ {} }}", p.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))
        }
    };
    let input = chain.hook == Some(FwHook::Input);
    match &chain.owner {
        Owner::Nft { family, table } => {
            let mut m = String::new();
            if via_lo {
                m.push_str("iif \"lo\" ");
            } else if input && !n.iif.is_empty() {
                m.push_str(&format!(
                    "iifname {{ {} }} ",
                    n.iif.iter().map(|i| format!("\"{i}\"")).collect::<Vec<_>>().join(", ")
                ));
            } else if !input && !n.oif.is_empty() {
                m.push_str(&format!(
                    "oifname {{ {} }} ",
                    n.oif.iter().map(|i| format!("\"{i}\"")).collect::<Vec<_>>().join(", ")
                ));
            }
            let fam = if v6 { "ip6" } else { "ip" };
            let sa: Vec<&Prefix> = n.saddr.iter().filter(|p| p.is_v6() == v6).collect();
            let da: Vec<&Prefix> = n.daddr.iter().filter(|p| p.is_v6() == v6).collect();
            if !sa.is_empty() {
                m.push_str(&format!(
                    "{fam} saddr {{ {} }} ",
                    sa.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                ));
            }
            if !da.is_empty() {
                m.push_str(&format!(
                    "{fam} daddr {{ {} }} ",
                    da.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                ));
            }
            if family == "inet" && sa.is_empty() && da.is_empty() && n.v6.is_some() {
                m.insert_str(0, if v6 { "meta nfproto ipv6 " } else { "meta nfproto ipv4 " });
            }
            if !n.dports.is_empty() {
                m.push_str(&format!("{proto} dport {} ", ports(&n.dports)));
            }
            if !n.sports.is_empty() {
                m.push_str(&format!("{proto} sport {} ", ports(&n.sports)));
            }
            if n.dports.is_empty() && n.sports.is_empty() {
                m.push_str(&format!("meta l4proto {proto} "));
            }
            match &u.at {
                DecidedAt::Rule(r) if r.handle.is_some() => format!(
                    "nft insert rule {family} {table} {} position {} {m}ct state untracked accept",
                    chain.name,
                    r.handle.unwrap_or(0)
                ),
                _ => format!("nft add rule {family} {table} {} {m}ct state untracked accept", chain.name),
            }
        }
        Owner::Iptables { variant, v6: ip6, .. } => {
            let mut m = String::new();
            if via_lo {
                m.push_str("-i lo ");
            } else if input && n.iif.len() == 1 {
                m.push_str(&format!("-i {} ", n.iif[0]));
            } else if !input && n.oif.len() == 1 {
                m.push_str(&format!("-o {} ", n.oif[0]));
            }
            if n.saddr.len() == 1 {
                m.push_str(&format!("-s {} ", n.saddr[0]));
            }
            if n.daddr.len() == 1 {
                m.push_str(&format!("-d {} ", n.daddr[0]));
            }
            m.push_str(&format!("-p {proto} "));
            let mp = |p: &[PortRange]| p.iter().map(|r| r.to_string().replace('-', ":")).collect::<Vec<_>>().join(",");
            if !n.dports.is_empty() {
                m.push_str(&format!("-m multiport --dports {} ", mp(&n.dports)));
            }
            if !n.sports.is_empty() {
                m.push_str(&format!("-m multiport --sports {} ", mp(&n.sports)));
            }
            let tool = variant.tool(*ip6, "");
            match &u.at {
                DecidedAt::Rule(r) => {
                    format!("{tool} -I {} {} {m}-m conntrack --ctstate UNTRACKED -j ACCEPT", chain.name, r.index)
                }
                DecidedAt::Policy => format!("{tool} -A {} {m}-m conntrack --ctstate UNTRACKED -j ACCEPT", chain.name),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nft_json(ns_script_json: &str) -> Firewall {
        match Firewall::parse(Some(ns_script_json), &[]) {
            Ok(f) => f,
            Err(e) => panic!("{e}"),
        }
    }

    /// `table inet raw_handmade` notracking udp/53 both ways, and a stateful filter.
    const HANDMADE: &str = r#"{"nftables":[
{"table":{"family":"inet","name":"raw_handmade","handle":1}},
{"chain":{"family":"inet","table":"raw_handmade","name":"pre","handle":1,"type":"filter","hook":"prerouting","prio":-300,"policy":"accept"}},
{"chain":{"family":"inet","table":"raw_handmade","name":"out","handle":2,"type":"filter","hook":"output","prio":-300,"policy":"accept"}},
{"rule":{"family":"inet","table":"raw_handmade","chain":"pre","handle":3,"expr":[{"match":{"op":"==","left":{"payload":{"protocol":"udp","field":"dport"}},"right":53}},{"notrack":null}]}},
{"rule":{"family":"inet","table":"raw_handmade","chain":"out","handle":4,"expr":[{"match":{"op":"==","left":{"payload":{"protocol":"udp","field":"sport"}},"right":53}},{"notrack":null}]}},
{"table":{"family":"inet","name":"host","handle":2}},
{"chain":{"family":"inet","table":"host","name":"input","handle":1,"type":"filter","hook":"input","prio":0,"policy":"drop"}},
{"rule":{"family":"inet","table":"host","chain":"input","handle":5,"expr":[{"match":{"op":"in","left":{"ct":{"key":"state"}},"right":["established","related"]}},{"accept":null}]}},
{"rule":{"family":"inet","table":"host","chain":"input","handle":8,"expr":[{"match":{"op":"==","left":{"meta":{"key":"iif"}},"right":"lo"}},{"accept":null}]}},
{"rule":{"family":"inet","table":"host","chain":"input","handle":6,"expr":[{"match":{"op":"==","left":{"payload":{"protocol":"udp","field":"dport"}},"right":53}},{"match":{"op":"in","left":{"ct":{"key":"state"}},"right":"new"}},{"accept":null}]}},
{"rule":{"family":"inet","table":"host","chain":"input","handle":7,"expr":[{"reject":null}]}}
]}"#;

    #[test]
    fn handmade_nft_blackhole_names_both_rules() {
        let fw = nft_json(HANDMADE);
        let flows = notrack_flows(&fw);
        assert_eq!(flows.len(), 2, "{flows:?}");
        assert_eq!(flows[0].side, Side::Server);
        assert_eq!(flows[0].describe(), "udp dport 53");
        assert_eq!(flows[1].side, Side::Server);
        assert!(!flows[0].ctguard && !fw.ctguard_present());
        let found = check(&fw, &flows);
        assert_eq!(found.len(), 1, "{found:?}");
        match &found[0] {
            Finding::Blackhole { notrack, chain, dropped_by, fix_command, proto } => {
                assert_eq!(notrack.at.chain, "nft inet raw_handmade pre");
                assert_eq!(chain, "nft inet host input");
                assert_eq!(dropped_by.rule, "reject");
                assert_eq!(*proto, Proto::Udp);
                assert!(fix_command.starts_with("nft insert rule inet host input position 7"), "{fix_command}");
                assert!(fix_command.ends_with("udp dport 53 ct state untracked accept"), "{fix_command}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn filter_chains_reached_follow_jumps_and_evaluated_flows_cover_both_states() {
        let text = r#"{"nftables":[
{"table":{"family":"inet","name":"t","handle":1}},
{"chain":{"family":"inet","table":"t","name":"input","handle":1,"type":"filter","hook":"input","prio":0,"policy":"drop"}},
{"chain":{"family":"inet","table":"t","name":"svc","handle":2}},
{"chain":{"family":"inet","table":"t","name":"unused","handle":3}},
{"chain":{"family":"inet","table":"t","name":"pre","handle":4,"type":"filter","hook":"prerouting","prio":-300,"policy":"accept"}},
{"rule":{"family":"inet","table":"t","chain":"input","handle":5,"expr":[{"jump":{"target":"svc"}}]}},
{"rule":{"family":"inet","table":"t","chain":"pre","handle":6,"expr":[{"match":{"op":"==","left":{"payload":{"protocol":"udp","field":"dport"}},"right":53}},{"notrack":null}]}}
]}"#;
        let fw = nft_json(text);
        let reached = filter_chains_reached(&fw);
        let names: std::collections::BTreeSet<&str> = reached.iter().map(|k| k.2.as_str()).collect();
        assert_eq!(names.into_iter().collect::<Vec<_>>(), ["input", "svc"]);
        let flows = notrack_flows(&fw);
        assert_eq!(flows.len(), 1, "{flows:?}");
        let eval = evaluated_flows(&flows);
        // udp, the input leg, both families, new and untracked.
        assert_eq!(eval.len(), 4, "{eval:?}");
        assert!(eval.iter().any(|f| f.ct == "new") && eval.iter().any(|f| f.ct == "untracked"));
        assert!(eval.iter().all(|f| f.proto == Proto::Udp && f.dports == flows[0].dports));
    }

    const SEED002: &str = "*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A PREROUTING -p udp -m udp --sport 53 -j NOTRACK
-A OUTPUT -p udp -m udp --dport 53 -j NOTRACK
COMMIT
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m state --state UNTRACKED -j ACCEPT
-A INPUT -m state --state RELATED,ESTABLISHED -j ACCEPT
-A INPUT -p tcp -m tcp --dport 22 -m state --state NEW -j ACCEPT
COMMIT
";

    #[test]
    fn seed_002_opens_every_port_to_source_port_53() {
        let fw = match Firewall::parse(None, &[(IptVariant::Legacy, false, SEED002.to_string())]) {
            Ok(f) => f,
            Err(e) => panic!("{e}"),
        };
        let flows = notrack_flows(&fw);
        assert_eq!(flows.len(), 2, "{flows:?}");
        assert_eq!((flows[0].hook, flows[0].side), (FwHook::Prerouting, Side::Client));
        assert_eq!((flows[1].hook, flows[1].side), (FwHook::Output, Side::Client));
        let found = check(&fw, &flows);
        assert_eq!(found.len(), 1, "{found:?}");
        match &found[0] {
            Finding::Open { notrack, accepted_by, proto } => {
                assert_eq!(notrack.at.rule, "-A PREROUTING -p udp -m udp --sport 53 -j NOTRACK");
                assert_eq!(accepted_by.rule, "-A INPUT -m state --state UNTRACKED -j ACCEPT");
                assert_eq!(*proto, Proto::Udp);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn iptables_notrack_behind_a_stateful_filter_is_a_blackhole_with_its_fix() {
        let text = "*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:CTGUARD-PRE - [0:0]
-A PREROUTING -j CTGUARD-PRE
-A CTGUARD-PRE -p udp -m multiport --dports 53 -m comment --comment \"ctguard:abc\" -j CT --notrack
COMMIT
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -p udp -m udp --dport 53 -m conntrack --ctstate NEW -j ACCEPT
COMMIT
";
        let fw = match Firewall::parse(None, &[(IptVariant::Nft, false, text.to_string())]) {
            Ok(f) => f,
            Err(e) => panic!("{e}"),
        };
        assert!(fw.ctguard_present());
        let flows = notrack_flows(&fw);
        assert_eq!(flows.len(), 1, "{flows:?}");
        assert!(flows[0].ctguard);
        let found = check(&fw, &flows);
        match found.as_slice() {
            [Finding::Blackhole { fix_command, dropped_by, .. }] => {
                assert_eq!(dropped_by.rule, "the chain's policy (drop)");
                assert_eq!(
                    fix_command,
                    "iptables-nft -A INPUT -p udp -m multiport --dports 53 -m conntrack --ctstate UNTRACKED -j ACCEPT"
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
