//! The insertion planner (DESIGN §6 `accept_untracked`): a pure function of the policy and the
//! parsed live state that finds every base filter chain on the input/output hooks (forward too
//! when `local_only = false`) that accepts a notracked flow while it is tracked and drops it
//! once untracked, and says which accept rule to insert there and where: just before the rule
//! that drops it (so blocklists above still apply), or appended when the chain's policy does.

use std::fmt::Write as _;

use serde::Serialize;

use super::flow::{cond_matches, evaluate, flow_for, peers, rule_matches, Direction, Flow, Outcome, Path, Place, Tri};
use crate::live::fw::{ChainKind, Cond, FwChain, FwHook, FwRule, FwTables, IptVariant, Owner, Verdict};
use crate::live::LiveState;
use crate::model::names::Tag;
use crate::model::{NotrackRule, Policy, PortRange, Prefix, Proto};

/// Where an accept rule goes in its chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "at")]
pub enum Position {
    /// Before the rule that drops the flow.
    Before {
        /// nft handle of that rule (a hint, DESIGN §1).
        handle: Option<u64>,
        /// Its 1-based index (iptables `-I CHAIN N`).
        index: usize,
        /// Its text.
        rule: String,
    },
    /// At the end: the chain's policy drops the flow.
    Append,
}

/// One accept rule to insert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Insertion {
    /// `nft inet host input`, `iptables-nft filter INPUT`, …
    pub chain: String,
    /// Table owner (how to write into it).
    #[serde(skip)]
    pub owner: Owner,
    /// Chain name.
    #[serde(skip)]
    pub chain_name: String,
    /// Hook.
    pub hook: FwHook,
    /// Which `[[notrack]]` entry.
    pub entry: usize,
    /// Protocol.
    pub proto: Proto,
    /// Direction of the flow at this hook.
    pub direction: Direction,
    /// IPv6 only (true), IPv4 only (false), or both (none).
    pub v6: Option<bool>,
    /// Where.
    pub position: Position,
    /// The rule: nft statement text, or iptables argument vectors (one or more rules).
    pub rule: RuleSpec,
    /// True for a wire rule without interface match (it accepts the flow on lo too).
    #[serde(skip)]
    pub wire_any_iface: bool,
    /// The entry narrowed to the restrictions the rule carries (sources, ports, interfaces).
    #[serde(skip)]
    pub narrowed: NotrackRule,
    /// Conditions carried beyond the entry's own fields (negations, the other direction's
    /// addresses or ports).
    #[serde(skip)]
    pub extra: Vec<Cond>,
}

/// The text of an inserted rule in its front end's syntax.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleSpec {
    /// nft statement (without `insert rule FAMILY TABLE CHAIN`).
    Nft(String),
    /// iptables argument vectors (without `-I CHAIN N`).
    Iptables(Vec<Vec<String>>),
}

/// What the planner found for one chain and flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The base chain's label (`nft inet host input`, `iptables-nft filter INPUT`).
    pub chain: String,
    /// Entry index.
    pub entry: usize,
    /// Protocol.
    pub proto: Proto,
    /// Direction.
    pub direction: Direction,
    /// Family restriction of the evaluated flow.
    pub v6: Option<bool>,
    /// The chain's verdict while tracked (`new` for requests, `established` for replies).
    pub tracked: Outcome,
    /// The chain's verdict once untracked.
    pub untracked: Outcome,
}

impl Decision {
    /// The chain accepts (some of) the flow tracked and drops it untracked: NOTRACK alone
    /// would blackhole it here.
    ///
    /// A maybe-accept that holds for the untracked flow too (a rule that does not look at ct
    /// state) does not count: it is not tracking that lets those packets in.
    pub fn blackholes(&self) -> bool {
        !self.untracked.accept && (self.tracked.accept || !self.state_dependent_accepts().is_empty())
    }

    /// The paths by which the tracked flow is accepted and the untracked one is not: the
    /// sure accept's path, or else every partial (maybe) accept that depends on ct state.
    pub fn tracked_accept_paths(&self) -> Vec<&Path> {
        if self.tracked.accept {
            vec![&self.tracked.path]
        } else {
            self.state_dependent_accepts()
        }
    }

    fn state_dependent_accepts(&self) -> Vec<&Path> {
        self.tracked.maybe_accepts.iter().filter(|p| !self.untracked.maybe_accepts.contains(p)).collect()
    }
}

/// Why an inserted accept cannot repeat the restriction under which the tracked flow is
/// accepted (the insertion would widen access; the lint refuses it without `--force`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uncarried {
    /// `nft inet host input`, …: the chain evaluated.
    pub chain: String,
    /// Entry index.
    pub entry: usize,
    /// Protocol.
    pub proto: Proto,
    /// The rule whose condition cannot be repeated.
    pub rule: String,
    /// Why.
    pub why: String,
}

/// A rule that stops applying to a notracked flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    /// The base chain evaluated.
    pub chain: String,
    /// Entry index.
    pub entry: usize,
    /// Protocol.
    pub proto: Proto,
    /// Direction.
    pub direction: Direction,
    /// The chain holding the rule and the rule's text.
    pub rule_chain: String,
    /// The rule.
    pub rule: String,
    /// True when dropping packets the ruleset dropped before is lost (access widens): a
    /// blocklist that matches only tracked packets, or one the inserted accept now skips.
    /// False for a rule whose lost effect is a rate limit, log, mark or counter.
    pub widens: bool,
    /// What happens.
    pub why: String,
}

/// The planner's result.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InsertionPlan {
    /// Every chain × flow that blackholes once untracked.
    pub decisions: Vec<Decision>,
    /// The accept rules to insert (for entries with `accept_untracked`).
    pub insertions: Vec<Insertion>,
    /// Restrictions an insertion could not repeat (each one widens access).
    pub uncarried: Vec<Uncarried>,
    /// Rules that stop applying once the flows are notracked (with the insertions in place).
    pub lost: Vec<Lost>,
}

/// Plans the accept insertions for `policy` against `live`; each rule carries `tag`.
pub fn plan(policy: &Policy, live: &LiveState, tag: &Tag) -> InsertionPlan {
    plan_chains(policy, &live.chains(), tag)
}

/// As [`plan`], on chains already merged into one view.
///
/// Two passes, both pure: the first finds every chain × flow that blackholes once untracked
/// and plans the accept for it where the untracked flow is dropped (in the chain that holds
/// the dropping rule, directly before it), carrying the restrictions under which the tracked
/// flow is accepted; the second evaluates the ruleset with those accepts in place and lists
/// every rule that stops applying ([`Lost`]): widening ones are lint errors, the others
/// (`lost-effect`) warnings.
pub fn plan_chains(policy: &Policy, tables: &FwTables, tag: &Tag) -> InsertionPlan {
    let mut out = InsertionPlan::default();
    let mut evaluated: Vec<Evaluated> = Vec::new();
    for (i, entry) in policy.notrack.iter().enumerate() {
        let views = flow_views(entry);
        for (hook, dir, view, not_lo) in &views {
            let requests = requests_of(*hook, *dir, view, &views);
            for chain in tables.base_chains(ChainKind::Filter, *hook) {
                for &proto in &entry.protocols {
                    let ctx = ChainCtx { tables, chain, entry_index: i, requests: &requests, tag };
                    plan_chain(&mut out, &mut evaluated, &ctx, view, proto, *dir, *not_lo);
                }
            }
        }
    }
    let after = with_insertions(tables, &out.insertions);
    for ev in &evaluated {
        lost_rules(&mut out, &after, ev);
    }
    out
}

/// One chain × flow the first pass evaluated, kept for the second.
struct Evaluated {
    owner: Owner,
    chain_name: String,
    label: String,
    entry: usize,
    proto: Proto,
    direction: Direction,
    untracked_flow: Flow,
    tracked: Outcome,
}

/// The (hook, direction, entry view, wire-only) combinations to evaluate for one entry.
///
/// Wire traffic and loopback traffic are evaluated apart, because host firewalls treat `lo`
/// on its own (`iif lo accept`): the wire view is the entry without `lo` (with no interface
/// list: every interface but `lo`); the local view is the entry on `lo` only, in all four
/// hook/direction combinations a local client and a local server produce.
pub fn flow_views(entry: &NotrackRule) -> Vec<(FwHook, Direction, NotrackRule, bool)> {
    let mut v = Vec::new();
    let lo_name = |n: &crate::model::names::IfName| n.as_str() == "lo";
    let wire_ifaces: Vec<_> = entry.interfaces.iter().filter(|n| !lo_name(n)).cloned().collect();
    let has_wire = entry.interfaces.is_empty() || !wire_ifaces.is_empty();
    if entry.queries() {
        // This host's own queries and their answers, on any interface of the entry (loopback
        // included: the upstream prefixes say where they go).
        v.push((FwHook::Output, Direction::Query, entry.clone(), false));
        v.push((FwHook::Input, Direction::Answer, entry.clone(), false));
    }
    if !entry.serves() {
        return v;
    }
    if has_wire {
        let wire = NotrackRule { interfaces: wire_ifaces, ..entry.clone() };
        v.push((FwHook::Input, Direction::Request, wire.clone(), true));
        v.push((FwHook::Output, Direction::Reply, wire.clone(), true));
        if !entry.local_only {
            v.push((FwHook::Forward, Direction::Request, wire.clone(), true));
            v.push((FwHook::Forward, Direction::Reply, wire, true));
        }
    }
    if entry.covers_loopback() {
        if let Ok(lo) = crate::model::names::IfName::parse("lo") {
            let local = NotrackRule { interfaces: vec![lo], ..entry.clone() };
            v.push((FwHook::Input, Direction::Request, local.clone(), false));
            v.push((FwHook::Output, Direction::Reply, local, false));
        }
        v.push((FwHook::Output, Direction::LoopbackRequest, entry.clone(), false));
        v.push((FwHook::Input, Direction::LoopbackReply, entry.clone(), false));
    }
    v
}

type View = (FwHook, Direction, NotrackRule, bool);

/// The request views a reply view answers: a reply only needs accepting when its request gets
/// in. Wire replies answer the wire request at the same hook family (input for output, forward
/// for forward); loopback replies answer the local query on both its hooks.
fn requests_of<'a>(hook: FwHook, dir: Direction, view: &NotrackRule, views: &'a [View]) -> Vec<&'a View> {
    let on_lo = view.interfaces.iter().any(|n| n.as_str() == "lo") && view.interfaces.len() == 1;
    views
        .iter()
        .filter(|(h, d, v, _)| match dir {
            Direction::Request | Direction::LoopbackRequest | Direction::Query => false,
            // An answer only needs accepting when its query gets out.
            Direction::Answer => *d == Direction::Query,
            Direction::Reply if hook == FwHook::Forward => *d == Direction::Request && *h == FwHook::Forward,
            Direction::Reply if !on_lo => {
                *d == Direction::Request && *h == FwHook::Input && v.interfaces == view.interfaces
            }
            Direction::Reply | Direction::LoopbackReply => {
                *d == Direction::LoopbackRequest
                    || (*d == Direction::Request
                        && *h == FwHook::Input
                        && v.interfaces.len() == 1
                        && v.interfaces[0].as_str() == "lo")
            }
        })
        .collect()
}

/// True when every base filter chain at the request's hook lets some of the tracked request in.
fn request_passes(tables: &FwTables, req: &View, proto: Proto, v6: bool) -> bool {
    let (hook, dir, view, not_lo) = req;
    tables.base_chains(ChainKind::Filter, *hook).all(|c| {
        c.owner.families() == (false, false)
            || !(if v6 { c.owner.families().1 } else { c.owner.families().0 })
            || evaluate(tables, c, &flow_for(view, proto, *dir, Some(v6), "new", *not_lo)).accepts_some()
    })
}

struct ChainCtx<'a> {
    tables: &'a FwTables,
    chain: &'a FwChain,
    entry_index: usize,
    requests: &'a [&'a View],
    tag: &'a Tag,
}

fn plan_chain(
    out: &mut InsertionPlan,
    evaluated: &mut Vec<Evaluated>,
    ctx: &ChainCtx<'_>,
    entry: &NotrackRule,
    proto: Proto,
    dir: Direction,
    not_lo: bool,
) {
    let (tables, chain, i, tag) = (ctx.tables, ctx.chain, ctx.entry_index, ctx.tag);
    let tracked_state = match dir {
        Direction::Request | Direction::LoopbackRequest | Direction::Query => "new",
        Direction::Reply | Direction::LoopbackReply | Direction::Answer => "established",
    };
    let addrs = peers(entry, dir);
    let (has4, has6) = chain.owner.families();
    let mut fams = Vec::new();
    for (present, v6) in [(has4, false), (has6, true)] {
        let restricted = !addrs.is_empty() && !addrs.iter().any(|p| p.is_v6() == v6);
        if present && !restricted {
            fams.push(v6);
        }
    }
    // Per family: the decision and the accepts to insert (narrowed entry, extra conditions).
    let mut found: Vec<(Decision, Vec<Carried>)> = Vec::new();
    for v6 in fams {
        if !ctx.requests.iter().all(|r| request_passes(tables, r, proto, v6)) {
            continue;
        }
        let tracked_flow = flow_for(entry, proto, dir, Some(v6), tracked_state, not_lo);
        let untracked_flow = flow_for(entry, proto, dir, Some(v6), "untracked", not_lo);
        let tracked = evaluate(tables, chain, &tracked_flow);
        let untracked = evaluate(tables, chain, &untracked_flow);
        evaluated.push(Evaluated {
            owner: chain.owner.clone(),
            chain_name: chain.name.clone(),
            label: chain.label(),
            entry: i,
            proto,
            direction: dir,
            untracked_flow: untracked_flow.clone(),
            tracked: tracked.clone(),
        });
        let d = Decision { chain: chain.label(), entry: i, proto, direction: dir, v6: Some(v6), tracked, untracked };
        if !d.blackholes() {
            continue;
        }
        let mut carried = Vec::new();
        for path in d.tracked_accept_paths() {
            match carry(entry, dir, &tracked_flow, path, d.tracked.truncated) {
                Ok(Some(c)) => carried.push(c),
                Ok(None) => {}
                Err((rule, why)) => {
                    out.uncarried.push(Uncarried { chain: chain.label(), entry: i, proto, rule, why });
                    // Forced past (`--force`): the unrestricted accept, as asked.
                    carried.push(Carried { entry: entry.clone(), extra: Vec::new() });
                }
            }
        }
        // Ways the untracked flow is already accepted (an accept inserted before, or the
        // operator's own) need no second accept.
        let present: Vec<Carried> = d
            .untracked
            .maybe_accepts
            .iter()
            .filter_map(|p| carry(entry, dir, &untracked_flow, p, false).ok().flatten())
            .collect();
        carried.retain(|c| !present.contains(c));
        if carried.is_empty() {
            continue;
        }
        // An unrestricted accept makes every restricted one redundant.
        if carried.iter().any(|c| c.extra.is_empty() && c.entry == *entry) {
            carried = vec![Carried { entry: entry.clone(), extra: Vec::new() }];
        }
        carried.dedup();
        found.push((d, carried));
    }
    // Both families blackholed at the same place, unrestricted, no per-family sources: one
    // rule for both.
    let unrestricted = |c: &[Carried]| c.len() == 1 && c[0].extra.is_empty() && c[0].entry == *entry;
    let merge = found.len() == 2
        && addrs.is_empty()
        && found[0].0.untracked.place == found[1].0.untracked.place
        && unrestricted(&found[0].1)
        && unrestricted(&found[1].1);
    // The local view of a request or reply needs no rule of its own where the wire rule for the
    // same flow has no interface match (it covers lo too).
    let covered_by_wire = |out: &InsertionPlan, label: &str, v6: Option<bool>| {
        let local = entry.interfaces.len() == 1
            && entry.interfaces[0].as_str() == "lo"
            && matches!(dir, Direction::Request | Direction::Reply);
        local
            && out.insertions.iter().any(|o| {
                o.chain == label
                    && o.entry == i
                    && o.proto == proto
                    && o.direction == dir
                    && o.wire_any_iface
                    && o.extra.is_empty()
                    && (o.v6.is_none() || o.v6 == v6)
            })
    };
    if entry.accept_untracked {
        let per_family: Vec<(Option<bool>, &Decision, &[Carried])> = if merge {
            vec![(None, &found[0].0, found[0].1.as_slice())]
        } else {
            found.iter().map(|(d, c)| (d.v6, d, c.as_slice())).collect()
        };
        let mut new = Vec::new();
        for (v6, d, carried) in per_family {
            let (chain_name, position) = match &d.untracked.place {
                Place::Before { chain, rule } => (
                    chain.clone(),
                    Position::Before { handle: rule.handle, index: rule.index, rule: rule.text.clone() },
                ),
                Place::End { chain } => (chain.clone(), Position::Append),
            };
            let label = format!("{} {chain_name}", chain.owner);
            for c in carried {
                if c.extra.is_empty() && c.entry == *entry && covered_by_wire(out, &label, v6) {
                    continue;
                }
                new.push(Insertion {
                    chain: label.clone(),
                    owner: chain.owner.clone(),
                    chain_name: chain_name.clone(),
                    hook: chain.hook.unwrap_or(FwHook::Input),
                    entry: i,
                    proto,
                    direction: dir,
                    v6,
                    position: position.clone(),
                    rule: rule_spec(&chain.owner, &c.entry, proto, dir, v6, tag, &c.extra),
                    wire_any_iface: not_lo && entry.interfaces.is_empty(),
                    narrowed: c.entry.clone(),
                    extra: c.extra.clone(),
                });
            }
        }
        // Several base chains × views can land on one user chain: plan each accept once.
        for n in new {
            if !out.insertions.iter().any(|o| o.chain == n.chain && o.position == n.position && o.rule == n.rule) {
                out.insertions.push(n);
            }
        }
    }
    out.decisions.extend(found.into_iter().map(|(d, _)| d));
}

/// The accept for one way the tracked flow is accepted: the entry narrowed to that way's
/// restrictions, and the conditions the entry cannot express.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Carried {
    entry: NotrackRule,
    extra: Vec<Cond>,
}

/// The restriction of `path` (every condition on it that holds for only part of the flow)
/// carried into the entry. `Ok(None)`: no packet of the flow can take this path. `Err`: a
/// condition cannot be repeated (the rule's text and why).
fn carry(
    entry: &NotrackRule,
    dir: Direction,
    flow: &Flow,
    path: &Path,
    truncated: bool,
) -> Result<Option<Carried>, (String, String)> {
    if truncated {
        let rule = path.last().map(|h| h.rule.text.clone()).unwrap_or_default();
        return Err((
            rule,
            format!("more than {} paths lead through this table; they were not all followed", super::flow::MAX_PATHS),
        ));
    }
    let mut n = entry.clone();
    let mut extra = Vec::new();
    for hop in path {
        for c in &hop.rule.conds {
            if cond_matches(c, flow) != Tri::Maybe {
                continue;
            }
            match narrow(&mut n, dir, c) {
                Narrowed::Into => {}
                Narrowed::Empty => return Ok(None),
                Narrowed::Extra => extra.push(c.clone()),
                Narrowed::Cannot(what) => {
                    return Err((
                        hop.rule.text.clone(),
                        format!(
                            "the tracked flow is accepted only under `{what}`, which an inserted rule cannot repeat"
                        ),
                    ))
                }
            }
        }
    }
    Ok(Some(Carried { entry: n, extra }))
}

enum Narrowed {
    /// Folded into the entry's own fields.
    Into,
    /// The entry and the condition have nothing in common.
    Empty,
    /// Kept as an extra condition of the inserted rule.
    Extra,
    /// Not expressible; the text says what.
    Cannot(String),
}

fn narrow(n: &mut NotrackRule, dir: Direction, c: &Cond) -> Narrowed {
    use Direction as D;
    // Which of the entry's fields each condition narrows in this direction.
    let peer_is_src = matches!(dir, D::Request | D::LoopbackRequest | D::Answer);
    let port_is_dst = matches!(dir, D::Request | D::LoopbackRequest | D::Query);
    let iface_is_in = matches!(dir, D::Request | D::LoopbackReply | D::Answer);
    let loopback = matches!(dir, D::LoopbackRequest | D::LoopbackReply);
    match c {
        Cond::Opaque(text) => Narrowed::Cannot(text.clone()),
        // Repeated by name (never folded into the entry: the set may change later).
        Cond::Named { name, inner } => match inner.as_ref() {
            Cond::Saddr { .. } | Cond::Daddr { .. } | Cond::Dport { .. } | Cond::Sport { .. } => Narrowed::Extra,
            Cond::Iif { .. } | Cond::Oif { .. } => Narrowed::Extra,
            _ => Narrowed::Cannot(format!("a lookup in set @{name}")),
        },
        Cond::Saddr { neg: false, prefixes } if peer_is_src => narrow_peers(n, dir, prefixes),
        Cond::Daddr { neg: false, prefixes } if !peer_is_src => narrow_peers(n, dir, prefixes),
        Cond::Dport { neg: false, ranges } if port_is_dst => narrow_ports(n, ranges),
        Cond::Sport { neg: false, ranges } if !port_is_dst => narrow_ports(n, ranges),
        Cond::Iif { neg: false, names } if iface_is_in && !loopback => narrow_ifaces(n, names),
        Cond::Oif { neg: false, names } if !iface_is_in && !loopback => narrow_ifaces(n, names),
        // Negated sets and ranges have no single-rule form in both front ends here.
        Cond::Saddr { neg: true, prefixes: v } | Cond::Daddr { neg: true, prefixes: v } if v.len() != 1 => {
            Narrowed::Cannot(format!("a negated address set ({} entries)", v.len()))
        }
        Cond::Dport { neg: true, ranges: v } | Cond::Sport { neg: true, ranges: v }
            if v.len() != 1 || !v[0].is_single() =>
        {
            Narrowed::Cannot("a negated port set or range".into())
        }
        Cond::Iif { neg: true, names: v } | Cond::Oif { neg: true, names: v } if v.len() != 1 => {
            Narrowed::Cannot("a negated interface set".into())
        }
        Cond::Saddr { .. } | Cond::Daddr { .. } | Cond::Dport { .. } | Cond::Sport { .. } => Narrowed::Extra,
        Cond::Iif { .. } | Cond::Oif { .. } => Narrowed::Extra,
        // Family, protocol and ct state are fixed for a flow: never "maybe".
        Cond::Family { .. } | Cond::Proto { .. } | Cond::CtState { .. } => Narrowed::Into,
    }
}

fn narrow_peers(n: &mut NotrackRule, dir: Direction, want: &[Prefix]) -> Narrowed {
    let have: &mut Vec<Prefix> = if dir.is_querying() { &mut n.upstreams } else { &mut n.sources };
    let fam = want.first().map(Prefix::is_v6);
    let (same, other): (Vec<Prefix>, Vec<Prefix>) = have.iter().partition(|p| Some(p.is_v6()) == fam);
    let narrowed: Vec<Prefix> = if same.is_empty() && other.is_empty() {
        want.to_vec()
    } else if same.is_empty() {
        // Only the other family's prefixes: this family's flow is not the entry's.
        return Narrowed::Empty;
    } else {
        let mut v = Vec::new();
        for a in &same {
            for b in want {
                if a.covers(b) {
                    v.push(*b);
                } else if b.covers(a) {
                    v.push(*a);
                }
            }
        }
        v
    };
    if narrowed.is_empty() {
        return Narrowed::Empty;
    }
    let mut v = narrowed;
    v.sort();
    v.dedup();
    let all = v.clone();
    v.retain(|p| !all.iter().any(|q| q != p && q.covers(p)));
    *have = v;
    Narrowed::Into
}

fn narrow_ports(n: &mut NotrackRule, want: &[PortRange]) -> Narrowed {
    let mut v = Vec::new();
    for a in &n.ports {
        for b in want {
            let (lo, hi) = (a.lo.max(b.lo), a.hi.min(b.hi));
            if lo <= hi {
                v.push(PortRange { lo, hi });
            }
        }
    }
    if v.is_empty() {
        return Narrowed::Empty;
    }
    v.sort();
    v.dedup();
    n.ports = v;
    Narrowed::Into
}

fn narrow_ifaces(n: &mut NotrackRule, want: &[String]) -> Narrowed {
    let names: Vec<crate::model::names::IfName> = if n.interfaces.is_empty() {
        match want.iter().map(|w| crate::model::names::IfName::parse(w)).collect::<Result<Vec<_>, _>>() {
            Ok(v) => v,
            Err(_) => return Narrowed::Cannot(format!("interface {}", want.join(","))),
        }
    } else {
        n.interfaces.iter().filter(|i| want.iter().any(|w| w == i.as_str())).cloned().collect()
    };
    if names.is_empty() {
        return Narrowed::Empty;
    }
    n.interfaces = names;
    Narrowed::Into
}

/// Rules on the tracked flow's way to its verdict that stop applying to the untracked flow
/// once the insertions are in place (`after`).
fn lost_rules(out: &mut InsertionPlan, after: &FwTables, ev: &Evaluated) {
    let reaches = |path: &Path, flow: &Flow| path.iter().all(|h| rule_matches(&h.rule, flow) != Tri::No);
    let untracked_after = after.find(&ev.owner, &ev.chain_name).map(|c| evaluate(after, c, &ev.untracked_flow));
    let mut push = |path: &Path, widens: bool, why: String| {
        // Name the rule where the untracked flow leaves the path (the one that matches only
        // through conntrack state), else the path's last rule.
        let Some(leaf) = path.iter().find(|h| rule_matches(&h.rule, &ev.untracked_flow) == Tri::No).or(path.last())
        else {
            return;
        };
        let l = Lost {
            chain: ev.label.clone(),
            entry: ev.entry,
            proto: ev.proto,
            direction: ev.direction,
            rule_chain: format!("{} {}", ev.owner, leaf.chain),
            rule: leaf.rule.text.clone(),
            widens,
            why,
        };
        if !out.lost.iter().any(|o| {
            o.chain == l.chain
                && o.entry == l.entry
                && o.rule_chain == l.rule_chain
                && o.rule == l.rule
                && o.direction == l.direction
        }) {
            out.lost.push(l);
        }
    };
    let rate = |path: &Path| path.iter().any(|h| h.rule.conds.iter().any(is_rate_condition));
    for path in &ev.tracked.maybe_drops {
        if !reaches(path, &ev.untracked_flow) {
            if rate(path) {
                push(
                    path,
                    false,
                    "a rate limit that matches only tracked packets: untracked packets are never limited".into(),
                );
            } else {
                push(path, true, "drops part of the flow only while it is tracked (it matches conntrack state): untracked packets skip it".into());
            }
            continue;
        }
        // Still reached by the untracked flow in the old ruleset: is it still reached with the
        // insertions in place?
        let Some(u) = &untracked_after else { continue };
        let leaf = path.last().map(|h| &h.rule);
        let still = u.maybe_drops.iter().any(|p| p.last().map(|h| &h.rule) == leaf)
            || (!u.accept && u.path.last().map(|h| &h.rule) == leaf);
        if !still && u.accepts_some() {
            if rate(path) {
                push(
                    path,
                    false,
                    "a rate limit below the inserted accept: untracked packets are accepted before it".into(),
                );
            } else {
                push(path, true, "drops part of the flow, but the inserted accept comes before it".into());
            }
        }
    }
    for path in &ev.tracked.effects {
        if !reaches(path, &ev.untracked_flow) {
            push(path, false, "matches the flow only through conntrack state: once untracked it stops applying (its log, counter, mark or rate bookkeeping)".into());
        }
    }
    // A flow the ruleset drops while tracked must not be accepted untracked.
    if let Some(u) = &untracked_after {
        if !ev.tracked.accepts_some() && u.accepts_some() {
            if let Some(p) = u.maybe_accepts.first().or(Some(&u.path)).filter(|p| !p.is_empty()) {
                push(p, true, "accepts the untracked flow, which the ruleset drops while tracked".into());
            }
        }
    }
}

/// Conditions that count or limit (`limit`, `recent`, `hashlimit`, meters, quotas, connlimit):
/// a drop under one of them is a rate limit, not a blocklist.
fn is_rate_condition(c: &Cond) -> bool {
    let Cond::Opaque(t) = c else { return false };
    let t = t.to_ascii_lowercase();
    ["limit", "recent", "hashlimit", "meter", "quota", "connlimit", "ct count", "set update", "set add"]
        .iter()
        .any(|k| t.contains(k))
}

/// `tables` with the planned accept rules inserted (pure; for evaluating the result).
pub fn with_insertions(tables: &FwTables, insertions: &[Insertion]) -> FwTables {
    let mut t = tables.clone();
    for ins in insertions {
        let Some(ch) = t.chains.iter_mut().find(|c| c.owner == ins.owner && c.name == ins.chain_name) else { continue };
        let v6s: Vec<bool> = match ins.v6 {
            Some(x) => vec![x],
            None => vec![false, true],
        };
        for v6 in v6s {
            let f = flow_for(&ins.narrowed, ins.proto, ins.direction, Some(v6), "untracked", false);
            let mut conds = flow_conds(&f);
            conds.extend(ins.extra.iter().cloned());
            conds.push(Cond::CtState { neg: false, states: vec!["untracked".into()] });
            let rule = FwRule {
                conds,
                verdict: Verdict::Accept,
                handle: None,
                index: 0,
                text: "(inserted) ct state untracked accept".into(),
                comment: None,
            };
            let at = match &ins.position {
                Position::Before { handle, index, .. } => ch
                    .rules
                    .iter()
                    .position(|r| (handle.is_some() && r.handle == *handle) || (handle.is_none() && r.index == *index))
                    .unwrap_or(ch.rules.len()),
                Position::Append => ch.rules.len(),
            };
            ch.rules.insert(at, rule);
        }
    }
    t
}

/// The conditions a rule matching exactly `f` would have (ports, addresses, interfaces,
/// family, protocol; not ct state).
fn flow_conds(f: &Flow) -> Vec<Cond> {
    let mut c = vec![Cond::Proto { neg: false, protos: vec![f.proto.number()] }];
    if let Some(v6) = f.v6 {
        c.push(Cond::Family { v6 });
    }
    if !f.dports.is_empty() {
        c.push(Cond::Dport { neg: false, ranges: f.dports.clone() });
    }
    if !f.sports.is_empty() {
        c.push(Cond::Sport { neg: false, ranges: f.sports.clone() });
    }
    if !f.saddr.is_empty() {
        c.push(Cond::Saddr { neg: false, prefixes: f.saddr.clone() });
    }
    if !f.daddr.is_empty() {
        c.push(Cond::Daddr { neg: false, prefixes: f.daddr.clone() });
    }
    if !f.iif.is_empty() {
        c.push(Cond::Iif { neg: false, names: f.iif.clone() });
    }
    if !f.oif.is_empty() {
        c.push(Cond::Oif { neg: false, names: f.oif.clone() });
    }
    c
}

fn rule_spec(
    owner: &Owner,
    n: &NotrackRule,
    proto: Proto,
    dir: Direction,
    v6: Option<bool>,
    tag: &Tag,
    extra: &[Cond],
) -> RuleSpec {
    match owner {
        Owner::Nft { family, .. } => {
            let mut rule = nft_accept_rule(n, proto, dir, v6, family == "inet", tag);
            if !extra.is_empty() {
                let text = extra.iter().map(|c| nft_cond(c, proto, v6)).collect::<Vec<_>>().join(" ");
                if let Some(at) = rule.find("ct state untracked accept") {
                    rule.insert_str(at, &format!("{text} "));
                }
            }
            RuleSpec::Nft(rule)
        }
        Owner::Iptables { v6: ip6, .. } => {
            use super::iptables::accept_querying_specs;
            use super::iptables::{accept_untracked_specs, Direction as D, IpFamily};
            let one = NotrackRule { protocols: vec![proto], ..n.clone() };
            let family = if *ip6 { IpFamily::V6 } else { IpFamily::V4 };
            let (d, loopback) = match dir {
                Direction::Request => (D::Input, false),
                Direction::Reply => (D::Output, false),
                Direction::LoopbackRequest => (D::Output, true),
                Direction::LoopbackReply => (D::Input, true),
                Direction::Query => (D::Output, false),
                Direction::Answer => (D::Input, false),
            };
            let mut specs = if dir.is_querying() {
                accept_querying_specs(&one, family, d, tag)
            } else {
                accept_untracked_specs(&one, family, d, loopback, tag)
            };
            if !extra.is_empty() {
                let args: Vec<String> = extra.iter().flat_map(ipt_cond).collect();
                for spec in specs.iter_mut() {
                    let at = spec.windows(2).position(|w| w[0] == "-m" && w[1] == "conntrack").unwrap_or(spec.len());
                    spec.splice(at..at, args.iter().cloned());
                }
            }
            RuleSpec::Iptables(specs)
        }
    }
}

/// One carried condition in nft syntax.
fn nft_cond(c: &Cond, proto: Proto, v6: Option<bool>) -> String {
    let op = |neg: bool| if neg { "!= " } else { "" };
    match c {
        Cond::Named { name, inner } => {
            // The inner match printed with the set's reference in place of its elements.
            let key = match inner.as_ref() {
                Cond::Saddr { prefixes, .. } | Cond::Daddr { prefixes, .. } => {
                    let fam =
                        if prefixes.first().is_some_and(Prefix::is_v6) || v6 == Some(true) { "ip6" } else { "ip" };
                    let field = if matches!(inner.as_ref(), Cond::Saddr { .. }) { "saddr" } else { "daddr" };
                    format!("{fam} {field}")
                }
                Cond::Dport { .. } => format!("{proto} dport"),
                Cond::Sport { .. } => format!("{proto} sport"),
                Cond::Iif { .. } => "iifname".into(),
                Cond::Oif { .. } => "oifname".into(),
                _ => return String::new(),
            };
            let neg = match inner.as_ref() {
                Cond::Saddr { neg, .. }
                | Cond::Daddr { neg, .. }
                | Cond::Dport { neg, .. }
                | Cond::Sport { neg, .. }
                | Cond::Iif { neg, .. }
                | Cond::Oif { neg, .. } => *neg,
                _ => false,
            };
            format!("{key} {}@{name}", op(neg))
        }
        Cond::Saddr { neg, prefixes } | Cond::Daddr { neg, prefixes } => {
            let fam = if prefixes.first().is_some_and(Prefix::is_v6) || v6 == Some(true) { "ip6" } else { "ip" };
            let field = if matches!(c, Cond::Saddr { .. }) { "saddr" } else { "daddr" };
            format!("{fam} {field} {}{}", op(*neg), nft_set(prefixes))
        }
        Cond::Dport { neg, ranges } | Cond::Sport { neg, ranges } => {
            let field = if matches!(c, Cond::Dport { .. }) { "dport" } else { "sport" };
            format!("{proto} {field} {}{}", op(*neg), nft_set(ranges))
        }
        Cond::Iif { neg, names } | Cond::Oif { neg, names } => {
            let kw = if matches!(c, Cond::Iif { .. }) { "iifname" } else { "oifname" };
            let quoted: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
            format!("{kw} {}{}", op(*neg), nft_set(&quoted))
        }
        _ => String::new(),
    }
}

/// One carried condition as iptables arguments (matches that do not clash with the ones the
/// accept already has: `iprange` for addresses, `multiport` for ports).
fn ipt_cond(c: &Cond) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let not = |a: &mut Vec<String>, neg: bool| {
        if neg {
            a.push("!".into());
        }
    };
    match c {
        Cond::Saddr { neg, prefixes } | Cond::Daddr { neg, prefixes } => {
            for p in prefixes {
                let (lo, hi) = p.bounds();
                let (first, last) = if p.is_v6() {
                    (std::net::Ipv6Addr::from(lo).to_string(), std::net::Ipv6Addr::from(hi).to_string())
                } else {
                    (std::net::Ipv4Addr::from(lo as u32).to_string(), std::net::Ipv4Addr::from(hi as u32).to_string())
                };
                a.extend(["-m".into(), "iprange".into()]);
                not(&mut a, *neg);
                let opt = if matches!(c, Cond::Saddr { .. }) { "--src-range" } else { "--dst-range" };
                a.extend([opt.to_string(), format!("{first}-{last}")]);
            }
        }
        Cond::Dport { neg, ranges } | Cond::Sport { neg, ranges } => {
            a.extend(["-m".into(), "multiport".into()]);
            not(&mut a, *neg);
            a.push(if matches!(c, Cond::Dport { .. }) { "--dports" } else { "--sports" }.into());
            a.push(
                ranges
                    .iter()
                    .map(|r| if r.lo == r.hi { r.lo.to_string() } else { format!("{}:{}", r.lo, r.hi) })
                    .collect::<Vec<_>>()
                    .join(","),
            );
        }
        Cond::Iif { neg, names } | Cond::Oif { neg, names } => {
            for n in names {
                not(&mut a, *neg);
                a.push(if matches!(c, Cond::Iif { .. }) { "-i" } else { "-o" }.into());
                a.push(n.clone());
            }
        }
        _ => {}
    }
    a
}

fn nft_set<T: std::fmt::Display>(items: &[T]) -> String {
    if items.len() == 1 {
        items[0].to_string()
    } else {
        format!("{{ {} }}", items.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", "))
    }
}

/// The nft accept rule for one flow: interface, addresses and ports as inline sets (a foreign
/// table cannot see ctguard's named sets), `ct state untracked accept`, the tag as comment.
/// `inet` says whether the target table is of family inet (only there may a per-family rule
/// need `meta nfproto`).
pub fn nft_accept_rule(
    n: &NotrackRule,
    proto: Proto,
    dir: Direction,
    v6: Option<bool>,
    inet: bool,
    tag: &Tag,
) -> String {
    let mut s = String::new();
    let ifaces: Vec<String> = n.interfaces.iter().map(|i| format!("\"{i}\"")).collect();
    let addrs: Vec<Prefix> = peers(n, dir).iter().filter(|p| v6.is_none_or(|x| p.is_v6() == x)).copied().collect();
    let fam = if v6 == Some(true) { "ip6" } else { "ip" };
    let ports = nft_set(&n.ports);
    match dir {
        Direction::Request | Direction::Reply => {
            let (iface_kw, addr_kw, port_kw) =
                if dir == Direction::Request { ("iifname", "saddr", "dport") } else { ("oifname", "daddr", "sport") };
            if !ifaces.is_empty() {
                let _ = write!(s, "{iface_kw} {} ", nft_set(&ifaces));
            }
            if !addrs.is_empty() {
                let _ = write!(s, "{fam} {addr_kw} {} ", nft_set(&addrs));
            }
            let _ = write!(s, "{proto} {port_kw} {ports} ");
        }
        Direction::Query | Direction::Answer => {
            // Always restricted to the upstreams (validation refuses a querying entry without
            // them): an answer accepted by source port alone would open every local port.
            let (iface_kw, addr_kw, port_kw) =
                if dir == Direction::Query { ("oifname", "daddr", "dport") } else { ("iifname", "saddr", "sport") };
            if !ifaces.is_empty() {
                let _ = write!(s, "{iface_kw} {} ", nft_set(&ifaces));
            }
            let _ = write!(s, "{fam} {addr_kw} {} ", nft_set(&addrs));
            let _ = write!(s, "{proto} {port_kw} {ports} ");
        }
        Direction::LoopbackRequest => {
            s.push_str("oif \"lo\" ");
            if !addrs.is_empty() {
                let _ = write!(s, "{fam} saddr {} ", nft_set(&addrs));
            }
            let _ = write!(s, "{proto} dport {ports} ");
        }
        Direction::LoopbackReply => {
            s.push_str("iif \"lo\" ");
            if !addrs.is_empty() {
                let _ = write!(s, "{fam} daddr {} ", nft_set(&addrs));
            }
            let _ = write!(s, "{proto} sport {ports} ");
        }
    }
    if inet && v6.is_some() && addrs.is_empty() {
        // A per-family rule in an inet table must not catch the other family.
        s.insert_str(0, if v6 == Some(true) { "meta nfproto ipv6 " } else { "meta nfproto ipv4 " });
    }
    let _ = write!(s, "ct state untracked accept comment \"{tag}\"");
    s
}

impl InsertionPlan {
    /// The nft insertions as one `nft -f` script (`insert rule … position H` before the
    /// dropping rule, `add rule …` where the policy drops). Handles are the ones read with the
    /// live state; the transaction re-checks them against the generation id.
    pub fn nft_script(&self) -> String {
        let mut s = String::new();
        for ins in &self.insertions {
            let (Owner::Nft { family, table }, RuleSpec::Nft(rule)) = (&ins.owner, &ins.rule) else { continue };
            match &ins.position {
                Position::Before { handle: Some(h), .. } => {
                    let _ = writeln!(s, "insert rule {family} {table} {} position {h} {rule}", ins.chain_name);
                }
                _ => {
                    let _ = writeln!(s, "add rule {family} {table} {} {rule}", ins.chain_name);
                }
            }
        }
        s
    }

    /// The iptables insertions for one variant and family as `iptables-restore --noflush`
    /// text. Inserts are emitted from the bottom of each chain up so earlier indexes stay valid.
    pub fn iptables_restore(&self, variant: IptVariant, v6: bool) -> String {
        type Specs<'a> = Vec<(&'a Insertion, &'a Vec<Vec<String>>)>;
        let mut by_table: std::collections::BTreeMap<&str, Specs<'_>> = Default::default();
        for ins in &self.insertions {
            if let (Owner::Iptables { variant: v, v6: f, table }, RuleSpec::Iptables(specs)) = (&ins.owner, &ins.rule) {
                if *v == variant && *f == v6 {
                    by_table.entry(table.as_str()).or_default().push((ins, specs));
                }
            }
        }
        let mut s = String::new();
        for (table, mut list) in by_table {
            let _ = writeln!(s, "*{table}");
            // Bottom-up by index; appends last in their original order.
            list.sort_by_key(|(ins, _)| {
                let idx = match &ins.position {
                    Position::Before { index, .. } => *index,
                    Position::Append => 0,
                };
                (ins.chain_name.clone(), std::cmp::Reverse(idx))
            });
            let mut appends = Vec::new();
            let mut i = 0;
            while i < list.len() {
                let (ins, _) = list[i];
                match &ins.position {
                    Position::Append => {
                        appends.push(list[i]);
                        i += 1;
                    }
                    Position::Before { index, .. } => {
                        // All insertions before the same rule, same chain: insert at `index`
                        // counting upward so their order is kept.
                        let group: Vec<_> = list[i..]
                            .iter()
                            .take_while(|(o, _)| {
                                matches!(&o.position, Position::Before { index: j, .. } if j == index)
                                    && o.chain_name == ins.chain_name
                            })
                            .copied()
                            .collect();
                        let mut k = *index;
                        for (g, specs) in &group {
                            for spec in *specs {
                                let _ = writeln!(s, "-I {} {k} {}", g.chain_name, super::iptables::spec_to_line(spec));
                                k += 1;
                            }
                        }
                        i += group.len().max(1);
                    }
                }
            }
            for (a, specs) in appends {
                for spec in specs {
                    let _ = writeln!(s, "-A {} {}", a.chain_name, super::iptables::spec_to_line(spec));
                }
            }
            s.push_str("COMMIT\n");
        }
        s
    }
}
