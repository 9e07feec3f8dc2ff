//! Static evaluation of a chain for a class of packets (a "flow"): does the chain accept or
//! drop them, and at which rule? Three-valued: a condition the evaluator cannot decide for the
//! whole flow is "maybe", and a maybe never counts as a decision. Pure; used by the insertion
//! planner and the lint.

use crate::live::fw::{Cond, FwChain, FwRule, FwTables, Owner, Verdict};
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

/// One step of a walk: a rule of a chain (a jump, goto or the deciding rule).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    /// The chain holding the rule (same table as the base chain).
    pub chain: String,
    /// The rule.
    pub rule: FwRule,
}

/// The rules from the base chain down to a rule: each jump/goto taken, then the rule itself
/// (shared hops: paths through the same jumps cost one pointer per hop).
pub type Path = Vec<std::sync::Arc<Hop>>;

/// Where a rule must go to be evaluated just before a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// Directly before this rule of this chain.
    Before {
        /// Chain name.
        chain: String,
        /// The rule.
        rule: FwRule,
    },
    /// At the end of this chain (the base chain's policy decides; with `goto`, the chain the
    /// packet was in when it fell through).
    End {
        /// Chain name.
        chain: String,
    },
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
    /// Where, in the base chain's terms.
    pub at: DecidedAt,
    /// The path to the deciding rule (empty when the base chain's policy decides).
    pub path: Path,
    /// Where a rule must be inserted to come directly before the decision: before the deciding
    /// rule in the chain that holds it, or at the end of the chain the packet fell through.
    pub place: Place,
    /// Paths to rules before the decision that accept part of the flow (conditions the flow
    /// may not meet): the flow is partly accepted there.
    pub maybe_accepts: Vec<Path>,
    /// Paths to rules before the decision that drop part of the flow.
    pub maybe_drops: Vec<Path>,
    /// Paths to rules before the decision that match (part of) the flow and act without
    /// deciding: log, counter, mark, rate-limit bookkeeping (`recent --set`), …
    pub effects: Vec<Path>,
    /// More accepting paths existed than are kept ([`MAX_PATHS`]): `maybe_accepts` is
    /// incomplete (the drop and effect lists keep their first [`MAX_PATHS`] silently).
    pub truncated: bool,
}

impl Outcome {
    /// Some packets of the flow are accepted by this chain.
    pub fn accepts_some(&self) -> bool {
        self.accept || !self.maybe_accepts.is_empty()
    }
}

/// How many paths each list of an [`Outcome`] keeps.
pub const MAX_PATHS: usize = 64;

/// How a chain ends for the packets of a flow that enter it, relative to that chain.
#[derive(Debug, Clone)]
enum End {
    /// A rule decided: accept (true) or drop, the path to it and its place.
    Final(bool, Path, Place),
    /// The packet leaves the chain without a verdict (end of chain or `return`): where.
    Fallthrough(Place),
}

/// The walk of one chain, relative to it; memoised per chain within one evaluation, so a
/// ruleset whose chains jump to each other many times over is walked once per chain (linear,
/// not exponential, in the number of jumps).
#[derive(Debug, Clone)]
struct ChainWalk {
    end: End,
    ma: Vec<Path>,
    md: Vec<Path>,
    fx: Vec<Path>,
    truncated: bool,
}

struct Walker<'a> {
    tables: &'a FwTables,
    flow: &'a Flow,
    index: std::collections::HashMap<(&'a Owner, &'a str), usize>,
    memo: std::collections::HashMap<usize, std::rc::Rc<ChainWalk>>,
    in_progress: std::collections::HashSet<usize>,
}

fn push_paths(dst: &mut Vec<Path>, prefix: &std::sync::Arc<Hop>, src: &[Path], truncated: &mut bool) {
    for p in src {
        if dst.len() >= MAX_PATHS {
            *truncated = true;
            return;
        }
        let mut q = Vec::with_capacity(p.len() + 1);
        q.push(prefix.clone());
        q.extend(p.iter().cloned());
        dst.push(q);
    }
}

fn push_lazy(dst: &mut Vec<Path>, hop: impl FnOnce() -> std::sync::Arc<Hop>, truncated: &mut bool) {
    if dst.len() >= MAX_PATHS {
        *truncated = true;
    } else {
        dst.push(vec![hop()]);
    }
}

fn push_one(dst: &mut Vec<Path>, p: Path, truncated: &mut bool) {
    if dst.len() >= MAX_PATHS {
        *truncated = true;
    } else {
        dst.push(p);
    }
}

impl<'a> Walker<'a> {
    fn new(tables: &'a FwTables, flow: &'a Flow) -> Walker<'a> {
        let index = tables.chains.iter().enumerate().map(|(i, c)| ((&c.owner, c.name.as_str()), i)).collect();
        Walker { tables, flow, index, memo: Default::default(), in_progress: Default::default() }
    }

    /// The walk of the chain at `ci`; `None` for a jump loop (the kernel refuses those).
    fn chain(&mut self, ci: usize) -> Option<std::rc::Rc<ChainWalk>> {
        if let Some(w) = self.memo.get(&ci) {
            return Some(w.clone());
        }
        if !self.in_progress.insert(ci) {
            return None;
        }
        let w = std::rc::Rc::new(self.walk(ci));
        self.in_progress.remove(&ci);
        self.memo.insert(ci, w.clone());
        Some(w)
    }

    fn walk(&mut self, ci: usize) -> ChainWalk {
        let tables = self.tables;
        let chain = &tables.chains[ci];
        let mut out = ChainWalk {
            end: End::Fallthrough(Place::End { chain: chain.name.clone() }),
            ma: Vec::new(),
            md: Vec::new(),
            fx: Vec::new(),
            truncated: false,
        };
        for rule in &chain.rules {
            let m = rule_matches(rule, self.flow);
            if m == Tri::No {
                continue;
            }
            let sure = m == Tri::Yes;
            // Built only when a path needs it (a 100k-rule blocklist is mostly "maybe drop"
            // rules whose paths are capped at MAX_PATHS).
            let hop = || std::sync::Arc::new(Hop { chain: chain.name.clone(), rule: rule.clone() });
            match &rule.verdict {
                Verdict::Accept | Verdict::Drop | Verdict::Reject => {
                    let accept = rule.verdict == Verdict::Accept;
                    if sure {
                        let place = Place::Before { chain: chain.name.clone(), rule: rule.clone() };
                        out.end = End::Final(accept, vec![hop()], place);
                        return out;
                    }
                    if accept {
                        push_lazy(&mut out.ma, hop, &mut out.truncated);
                    } else {
                        push_lazy(&mut out.md, hop, &mut false);
                    }
                }
                Verdict::Jump(name) | Verdict::Goto(name) => {
                    let goto = matches!(rule.verdict, Verdict::Goto(_));
                    let sub = self.index.get(&(&chain.owner, name.as_str())).copied().and_then(|i| self.chain(i));
                    let Some(sub) = sub else { continue };
                    let hop = hop();
                    push_paths(&mut out.ma, &hop, &sub.ma, &mut out.truncated);
                    // Only an incomplete list of accepts matters (restrictions to carry); the
                    // drop and effect lists are findings, the first MAX_PATHS of them enough.
                    push_paths(&mut out.md, &hop, &sub.md, &mut false);
                    push_paths(&mut out.fx, &hop, &sub.fx, &mut false);
                    out.truncated |= sub.truncated;
                    match &sub.end {
                        End::Final(accept, path, place) => {
                            let mut full = vec![hop];
                            full.extend(path.iter().cloned());
                            if sure {
                                out.end = End::Final(*accept, full, place.clone());
                                return out;
                            }
                            if *accept {
                                push_one(&mut out.ma, full, &mut out.truncated);
                            } else {
                                push_one(&mut out.md, full, &mut false);
                            }
                        }
                        End::Fallthrough(place) if goto && sure => {
                            out.end = End::Fallthrough(place.clone());
                            return out;
                        }
                        End::Fallthrough(_) => {}
                    }
                }
                Verdict::Return if sure => {
                    out.end = End::Fallthrough(Place::Before { chain: chain.name.clone(), rule: rule.clone() });
                    return out;
                }
                Verdict::Return => {}
                // log, counter, limit bookkeeping, marks; NAT or queue verdicts in a filter
                // chain: an effect on the packets it matches.
                _ => push_lazy(&mut out.fx, hop, &mut false),
            }
        }
        out
    }
}

/// Evaluates base chain `chain` for `flow`, following jumps and gotos into chains of the same
/// table. Pure; linear in the size of the table.
pub fn evaluate(tables: &FwTables, chain: &FwChain, flow: &Flow) -> Outcome {
    let mut w = Walker::new(tables, flow);
    let ci = w.index.get(&(&chain.owner, chain.name.as_str())).copied();
    let walked = match ci {
        Some(ci) => w.chain(ci).map(|r| (*r).clone()),
        // A chain that is not in `tables`: walk it on its own.
        None => {
            let mut own = tables.clone();
            own.chains.push(chain.clone());
            let mut w2 = Walker::new(&own, flow);
            let ci = own.chains.len() - 1;
            return outcome_of(w2.chain(ci).map(|r| (*r).clone()), chain);
        }
    };
    outcome_of(walked, chain)
}

fn outcome_of(walked: Option<ChainWalk>, chain: &FwChain) -> Outcome {
    let policy = chain.policy_accept.unwrap_or(true);
    let Some(w) = walked else {
        return Outcome {
            accept: policy,
            at: DecidedAt::Policy,
            path: Vec::new(),
            place: Place::End { chain: chain.name.clone() },
            maybe_accepts: Vec::new(),
            maybe_drops: Vec::new(),
            effects: Vec::new(),
            truncated: true,
        };
    };
    let (accept, at, path, place) = match w.end {
        End::Final(accept, path, place) => (accept, DecidedAt::Rule(path[0].rule.clone()), path, place),
        End::Fallthrough(place) => (policy, DecidedAt::Policy, Vec::new(), place),
    };
    Outcome { accept, at, path, place, maybe_accepts: w.ma, maybe_drops: w.md, effects: w.fx, truncated: w.truncated }
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

/// Whether one condition holds for the whole flow.
pub fn cond_matches(c: &Cond, f: &Flow) -> Tri {
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
        Cond::Named { inner, .. } => cond_matches(inner, f),
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
