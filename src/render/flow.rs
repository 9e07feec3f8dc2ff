//! Static evaluation of a chain for a class of packets (a "flow"): does the chain accept or
//! drop them, and at which rule? Three-valued: a condition the evaluator cannot decide for the
//! whole flow is "maybe", and a maybe never counts as a decision. Pure; used by the insertion
//! planner and the lint.

use crate::live::fw::{Cond, FwChain, FwRule, FwTables, Verdict};
use crate::model::{NotrackRule, PortRange, Prefix, Proto};

/// Which side of the flow ports and addresses are on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    /// Transport protocol.
    pub proto: Proto,
    /// Destination ports (empty = any).
    pub dports: Vec<PortRange>,
    /// Source ports (empty = any).
    pub sports: Vec<PortRange>,
    /// Source prefixes (empty = any).
    pub saddr: Vec<Prefix>,
    /// Destination prefixes (empty = any).
    pub daddr: Vec<Prefix>,
    /// Input interfaces (empty = any).
    pub iif: Vec<String>,
    /// Output interfaces (empty = any).
    pub oif: Vec<String>,
    /// Input interfaces the flow never uses (when `iif` is empty).
    pub iif_not: Vec<String>,
    /// Output interfaces the flow never uses (when `oif` is empty).
    pub oif_not: Vec<String>,
    /// Restricted to one family: Some(true) = IPv6 only, Some(false) = IPv4 only.
    pub v6: Option<bool>,
    /// Conntrack state of the packets.
    pub ct: String,
}

/// Three-valued match result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tri {
    /// Matches every packet of the flow.
    Yes,
    /// Matches none.
    No,
    /// Matches some, or cannot tell.
    Maybe,
}

impl Tri {
    fn not(self) -> Tri {
        match self {
            Tri::Yes => Tri::No,
            Tri::No => Tri::Yes,
            Tri::Maybe => Tri::Maybe,
        }
    }
    fn and(self, o: Tri) -> Tri {
        match (self, o) {
            (Tri::No, _) | (_, Tri::No) => Tri::No,
            (Tri::Yes, Tri::Yes) => Tri::Yes,
            _ => Tri::Maybe,
        }
    }
}

/// Where a chain's decision was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecidedAt {
    /// At this rule of the base chain (a jump that decided counts as the jump rule).
    Rule(FwRule),
    /// By the base chain's policy.
    Policy,
}

/// The outcome of evaluating a base chain for a flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// True = accept, false = drop/reject.
    pub accept: bool,
    /// Where.
    pub at: DecidedAt,
    /// Rules before the decision that accept part of the flow (conditions the flow may not
    /// meet): the flow is partly accepted there.
    pub maybe_accepts: Vec<FwRule>,
    /// Rules before the decision that drop part of the flow.
    pub maybe_drops: Vec<FwRule>,
}

impl Outcome {
    /// Some packets of the flow are accepted by this chain.
    pub fn accepts_some(&self) -> bool {
        self.accept || !self.maybe_accepts.is_empty()
    }
}

/// How deep jumps are followed before giving up (loops are refused by the kernel anyway).
const MAX_DEPTH: usize = 16;

enum Walk {
    Final(bool, Option<FwRule>),
    Fallthrough,
}

/// Evaluates base chain `chain` for `flow`, following jumps into chains of the same table.
pub fn evaluate(tables: &FwTables, chain: &FwChain, flow: &Flow) -> Outcome {
    let mut ma = Vec::new();
    let mut md = Vec::new();
    match walk(tables, chain, flow, 0, &mut ma, &mut md, false) {
        Walk::Final(accept, Some(rule)) => {
            Outcome { accept, at: DecidedAt::Rule(rule), maybe_accepts: ma, maybe_drops: md }
        }
        Walk::Final(accept, None) => Outcome { accept, at: DecidedAt::Policy, maybe_accepts: ma, maybe_drops: md },
        Walk::Fallthrough => Outcome {
            accept: chain.policy_accept.unwrap_or(true),
            at: DecidedAt::Policy,
            maybe_accepts: ma,
            maybe_drops: md,
        },
    }
}

fn walk(
    tables: &FwTables,
    chain: &FwChain,
    flow: &Flow,
    depth: usize,
    ma: &mut Vec<FwRule>,
    md: &mut Vec<FwRule>,
    uncertain: bool,
) -> Walk {
    for rule in &chain.rules {
        let m = rule_matches(rule, flow);
        if m == Tri::No {
            continue;
        }
        let sure = m == Tri::Yes && !uncertain;
        let sub = |name: &str, ma: &mut Vec<FwRule>, md: &mut Vec<FwRule>| -> Walk {
            match tables.find(&chain.owner, name) {
                Some(c) if depth < MAX_DEPTH => walk(tables, c, flow, depth + 1, ma, md, !sure),
                _ => Walk::Fallthrough,
            }
        };
        match &rule.verdict {
            Verdict::Accept if sure => return Walk::Final(true, Some(rule.clone())),
            Verdict::Drop | Verdict::Reject if sure => return Walk::Final(false, Some(rule.clone())),
            Verdict::Accept => ma.push(rule.clone()),
            Verdict::Drop | Verdict::Reject => md.push(rule.clone()),
            Verdict::Jump(name) => {
                let mut sub_ma = Vec::new();
                let mut sub_md = Vec::new();
                let r = sub(name, &mut sub_ma, &mut sub_md);
                // Findings point at the rule in the base chain a user can see and move.
                if !sub_ma.is_empty() {
                    ma.push(rule.clone());
                }
                if !sub_md.is_empty() {
                    md.push(rule.clone());
                }
                if let Walk::Final(accept, _) = r {
                    if sure {
                        return Walk::Final(accept, Some(rule.clone()));
                    }
                    if accept {
                        ma.push(rule.clone())
                    } else {
                        md.push(rule.clone())
                    }
                }
            }
            Verdict::Goto(name) => {
                let r = sub(name, ma, md);
                if sure {
                    return match r {
                        Walk::Final(accept, _) => Walk::Final(accept, Some(rule.clone())),
                        Walk::Fallthrough => Walk::Fallthrough,
                    };
                }
            }
            Verdict::Return if sure => return Walk::Fallthrough,
            _ => {}
        }
    }
    if depth == 0 {
        if let Some(accept) = chain.policy_accept {
            return Walk::Final(accept, None);
        }
    }
    Walk::Fallthrough
}

/// Whether every condition of `rule` holds for the whole flow.
pub fn rule_matches(rule: &FwRule, flow: &Flow) -> Tri {
    rule.conds.iter().fold(Tri::Yes, |acc, c| acc.and(cond_matches(c, flow)))
}

fn neg(n: bool, t: Tri) -> Tri {
    if n {
        t.not()
    } else {
        t
    }
}

fn cond_matches(c: &Cond, f: &Flow) -> Tri {
    match c {
        Cond::Proto { neg: n, protos } => neg(*n, tri(protos.contains(&f.proto.number()))),
        Cond::Dport { neg: n, ranges } => neg(*n, ports_in(&f.dports, ranges)),
        Cond::Sport { neg: n, ranges } => neg(*n, ports_in(&f.sports, ranges)),
        Cond::Saddr { neg: n, prefixes } => neg(*n, addrs_in(&f.saddr, f.v6, prefixes)),
        Cond::Daddr { neg: n, prefixes } => neg(*n, addrs_in(&f.daddr, f.v6, prefixes)),
        Cond::Family { v6 } => match f.v6 {
            Some(x) => tri(x == *v6),
            None => Tri::Maybe,
        },
        Cond::Iif { neg: n, names } => neg(*n, names_in(&f.iif, &f.iif_not, names)),
        Cond::Oif { neg: n, names } => neg(*n, names_in(&f.oif, &f.oif_not, names)),
        Cond::CtState { neg: n, states } => neg(*n, tri(states.iter().any(|s| s == &f.ct))),
        Cond::Opaque(_) => Tri::Maybe,
    }
}

fn tri(b: bool) -> Tri {
    if b {
        Tri::Yes
    } else {
        Tri::No
    }
}

/// Flow values `have` (empty = all ports) against a rule's `want`.
fn ports_in(have: &[PortRange], want: &[PortRange]) -> Tri {
    let have: Vec<PortRange> = if have.is_empty() { vec![PortRange { lo: 0, hi: 65535 }] } else { have.to_vec() };
    let covered = |r: &PortRange| {
        // Is every port of r inside the union of want? Walk r across want's ranges.
        let mut sorted = want.to_vec();
        sorted.sort();
        let mut next = r.lo as u32;
        for w in &sorted {
            if (w.lo as u32) <= next && (w.hi as u32) >= next {
                next = w.hi as u32 + 1;
            }
        }
        next > r.hi as u32
    };
    let overlaps = |r: &PortRange| want.iter().any(|w| w.lo <= r.hi && r.lo <= w.hi);
    if have.iter().all(covered) {
        Tri::Yes
    } else if !have.iter().any(overlaps) {
        Tri::No
    } else {
        Tri::Maybe
    }
}

fn addrs_in(have: &[Prefix], v6: Option<bool>, want: &[Prefix]) -> Tri {
    let fam_v6 = want.first().map(Prefix::is_v6);
    if let (Some(a), Some(b)) = (v6, fam_v6) {
        if a != b {
            return Tri::No;
        }
    }
    let have: Vec<&Prefix> = have.iter().filter(|p| Some(p.is_v6()) == fam_v6).collect();
    if have.is_empty() {
        // Any address (or only the other family's restrictions): covered only by /0.
        return if want.iter().any(|w| w.len() == 0) && v6.is_some() { Tri::Yes } else { Tri::Maybe };
    }
    let covered = |h: &&Prefix| want.iter().any(|w| w.covers(h));
    let overlaps = |h: &&Prefix| want.iter().any(|w| w.covers(h) || h.covers(w));
    if have.iter().all(covered) && v6.is_some() {
        Tri::Yes
    } else if !have.iter().any(overlaps) && v6.is_some() {
        Tri::No
    } else {
        Tri::Maybe
    }
}

fn names_in(have: &[String], excluded: &[String], want: &[String]) -> Tri {
    if have.is_empty() {
        return if !want.is_empty() && want.iter().all(|w| excluded.contains(w)) { Tri::No } else { Tri::Maybe };
    }
    if have.iter().all(|h| want.contains(h)) {
        Tri::Yes
    } else if !have.iter().any(|h| want.contains(h)) {
        Tri::No
    } else {
        Tri::Maybe
    }
}

/// Which way a flow crosses a filter hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Requests arriving at the service (input; forward towards the server).
    Request,
    /// Replies leaving the service.
    Reply,
    /// Local client's request leaving over loopback (output hook, `oif lo`).
    LoopbackRequest,
    /// Local client's reply arriving over loopback (input hook, `iif lo`).
    LoopbackReply,
    /// This host's own query to an upstream (output hook: destination port and address).
    Query,
    /// The upstream's answer to it (input hook: source port and address).
    Answer,
}

impl Direction {
    /// True for the querying side's directions ([`Direction::Query`], [`Direction::Answer`]).
    pub fn is_querying(self) -> bool {
        matches!(self, Direction::Query | Direction::Answer)
    }
}

/// The peer prefixes of an entry's flow in `dir`: its upstreams on the querying side, its
/// sources (clients) on the serving side.
pub fn peers(n: &NotrackRule, dir: Direction) -> &[Prefix] {
    if dir.is_querying() {
        &n.upstreams
    } else {
        &n.sources
    }
}

/// The flow of one notrack entry and protocol in a direction, in one state. With `not_lo`
/// and no interface list, the flow is the wire traffic only (loopback is evaluated apart).
pub fn flow_for(n: &NotrackRule, proto: Proto, dir: Direction, v6: Option<bool>, ct: &str, not_lo: bool) -> Flow {
    let lo = || vec!["lo".to_string()];
    let ifaces: Vec<String> = n.interfaces.iter().map(|i| i.as_str().to_string()).collect();
    let mut f = Flow {
        proto,
        dports: Vec::new(),
        sports: Vec::new(),
        saddr: Vec::new(),
        daddr: Vec::new(),
        iif: Vec::new(),
        oif: Vec::new(),
        iif_not: Vec::new(),
        oif_not: Vec::new(),
        v6,
        ct: ct.to_string(),
    };
    let not_lo = not_lo && ifaces.is_empty();
    let src: Vec<Prefix> = peers(n, dir).iter().filter(|p| v6.is_none_or(|x| p.is_v6() == x)).copied().collect();
    match dir {
        Direction::Request => {
            f.dports = n.ports.clone();
            f.saddr = src;
            f.iif = ifaces;
            if not_lo {
                f.iif_not = lo();
            }
        }
        Direction::Reply => {
            f.sports = n.ports.clone();
            f.daddr = src;
            f.oif = ifaces;
            if not_lo {
                f.oif_not = lo();
            }
        }
        Direction::LoopbackRequest => {
            f.dports = n.ports.clone();
            f.saddr = src;
            f.oif = lo();
        }
        Direction::LoopbackReply => {
            f.sports = n.ports.clone();
            f.daddr = src;
            f.iif = lo();
        }
        Direction::Query => {
            f.dports = n.ports.clone();
            f.daddr = src;
            f.oif = ifaces;
        }
        Direction::Answer => {
            f.sports = n.ports.clone();
            f.saddr = src;
            f.iif = ifaces;
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_coverage() {
        let p = |lo, hi| PortRange { lo, hi };
        assert_eq!(ports_in(&[p(53, 53)], &[p(53, 53)]), Tri::Yes);
        assert_eq!(ports_in(&[p(53, 54)], &[p(53, 53), p(54, 60)]), Tri::Yes);
        assert_eq!(ports_in(&[p(53, 54)], &[p(53, 53)]), Tri::Maybe);
        assert_eq!(ports_in(&[p(53, 53)], &[p(22, 22)]), Tri::No);
        assert_eq!(ports_in(&[], &[p(22, 22)]), Tri::Maybe);
    }

    #[test]
    fn address_coverage() {
        let net = |s: &str| crate::model::parse_prefix(s).expect("prefix");
        assert_eq!(addrs_in(&[], Some(false), &[net("10.0.0.0/8")]), Tri::Maybe);
        assert_eq!(addrs_in(&[], Some(true), &[net("10.0.0.0/8")]), Tri::No);
        assert_eq!(addrs_in(&[net("10.1.0.0/16")], Some(false), &[net("10.0.0.0/8")]), Tri::Yes);
        assert_eq!(addrs_in(&[net("192.0.2.0/24")], Some(false), &[net("10.0.0.0/8")]), Tri::No);
    }
}
