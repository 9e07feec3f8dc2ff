//! The insertion planner (DESIGN §6 `accept_untracked`): a pure function of the policy and the
//! parsed live state that finds every base filter chain on the input/output hooks (forward too
//! when `local_only = false`) that accepts a notracked flow while it is tracked and drops it
//! once untracked, and says which accept rule to insert there and where: just before the rule
//! that drops it (so blocklists above still apply), or appended when the chain's policy does.

use std::fmt::Write as _;

use serde::Serialize;

use super::flow::{evaluate, flow_for, peers, DecidedAt, Direction, Outcome};
use crate::live::fw::{ChainKind, FwChain, FwHook, FwRule, FwTables, IptVariant, Owner};
use crate::live::LiveState;
use crate::model::names::Tag;
use crate::model::{NotrackRule, Policy, Prefix, Proto};

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
    /// The base chain.
    pub chain: FwChain,
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
        !self.untracked.accept && (self.tracked.accept || self.state_dependent_accept().is_some())
    }

    /// The first rule that accepts part of the flow while tracked but not once untracked.
    fn state_dependent_accept(&self) -> Option<&FwRule> {
        self.tracked.maybe_accepts.iter().find(|r| !self.untracked.maybe_accepts.contains(r))
    }
    /// The tracked accept depends on conditions the policy's flow does not carry (a source or
    /// interface restriction): an unconditional untracked accept would skip them.
    pub fn skips_restriction(&self) -> Option<&FwRule> {
        if self.blackholes() && !self.tracked.accept {
            self.state_dependent_accept()
        } else {
            None
        }
    }
}

/// The planner's result.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InsertionPlan {
    /// Every chain × flow that blackholes once untracked.
    pub decisions: Vec<Decision>,
    /// The accept rules to insert (for entries with `accept_untracked`).
    pub insertions: Vec<Insertion>,
}

/// Plans the accept insertions for `policy` against `live`; each rule carries `tag`.
pub fn plan(policy: &Policy, live: &LiveState, tag: &Tag) -> InsertionPlan {
    plan_chains(policy, &live.chains(), tag)
}

/// As [`plan`], on chains already merged into one view.
pub fn plan_chains(policy: &Policy, tables: &FwTables, tag: &Tag) -> InsertionPlan {
    let mut out = InsertionPlan::default();
    for (i, entry) in policy.notrack.iter().enumerate() {
        let views = flow_views(entry);
        for (hook, dir, view, not_lo) in &views {
            let requests = requests_of(*hook, *dir, view, &views);
            for chain in tables.base_chains(ChainKind::Filter, *hook) {
                for &proto in &entry.protocols {
                    let ctx = ChainCtx { tables, chain, entry_index: i, requests: &requests, tag };
                    plan_chain(&mut out, &ctx, view, proto, *dir, *not_lo);
                }
            }
        }
    }
    out
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
    let mut found: Vec<Decision> = Vec::new();
    for v6 in fams {
        if !ctx.requests.iter().all(|r| request_passes(tables, r, proto, v6)) {
            continue;
        }
        let tracked = evaluate(tables, chain, &flow_for(entry, proto, dir, Some(v6), tracked_state, not_lo));
        let untracked = evaluate(tables, chain, &flow_for(entry, proto, dir, Some(v6), "untracked", not_lo));
        let d = Decision { chain: chain.clone(), entry: i, proto, direction: dir, v6: Some(v6), tracked, untracked };
        if d.blackholes() {
            found.push(d);
        }
    }
    // Both families blackholed at the same place and no per-family sources: one rule for both.
    let merge = found.len() == 2 && addrs.is_empty() && found[0].untracked.at == found[1].untracked.at;
    let families: Vec<Option<bool>> = if merge { vec![None] } else { found.iter().map(|d| d.v6).collect() };
    // The local view of a request or reply needs no rule of its own where the wire rule for the
    // same flow has no interface match (it covers lo too).
    let covered_by_wire = |v6: Option<bool>| {
        let local = entry.interfaces.len() == 1
            && entry.interfaces[0].as_str() == "lo"
            && matches!(dir, Direction::Request | Direction::Reply);
        local
            && out.insertions.iter().any(|o| {
                o.chain == chain.label()
                    && o.entry == i
                    && o.proto == proto
                    && o.direction == dir
                    && o.wire_any_iface
                    && (o.v6.is_none() || o.v6 == v6)
            })
    };
    let covered: Vec<bool> = families.iter().map(|v6| covered_by_wire(*v6)).collect();
    if entry.accept_untracked {
        for ((v6, d), covered) in families.into_iter().zip(found.iter()).zip(covered) {
            if covered {
                continue;
            }
            let position = match &d.untracked.at {
                DecidedAt::Rule(r) => Position::Before { handle: r.handle, index: r.index, rule: r.text.clone() },
                DecidedAt::Policy => Position::Append,
            };
            out.insertions.push(Insertion {
                chain: chain.label(),
                owner: chain.owner.clone(),
                chain_name: chain.name.clone(),
                hook: chain.hook.unwrap_or(FwHook::Input),
                entry: i,
                proto,
                direction: dir,
                v6,
                position,
                rule: rule_spec(&chain.owner, entry, proto, dir, v6, tag),
                wire_any_iface: not_lo && entry.interfaces.is_empty(),
            });
        }
    }
    out.decisions.extend(found);
}

fn rule_spec(owner: &Owner, n: &NotrackRule, proto: Proto, dir: Direction, v6: Option<bool>, tag: &Tag) -> RuleSpec {
    match owner {
        Owner::Nft { family, .. } => RuleSpec::Nft(nft_accept_rule(n, proto, dir, v6, family == "inet", tag)),
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
                Direction::Query => return RuleSpec::Iptables(accept_querying_specs(&one, family, D::Output, tag)),
                Direction::Answer => return RuleSpec::Iptables(accept_querying_specs(&one, family, D::Input, tag)),
            };
            RuleSpec::Iptables(accept_untracked_specs(&one, family, d, loopback, tag))
        }
    }
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
