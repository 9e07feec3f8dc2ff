//! The intermediate form of `table inet ctguard`: what the policy becomes, independent of how
//! it reaches the kernel. [`super::nft_script`] prints it as an `nft -f` script and
//! [`super::nft_batch`] encodes it as one netlink batch; a kernel test proves both give the
//! same `nft list table inet ctguard`. Pure.

use crate::model::names::{IfName, Tag};
use crate::model::{NotrackRule, Policy, PortRange, Prefix, Proto};

/// ctguard's own table (family inet).
pub const TABLE_NAME: &str = "ctguard";
/// Priority of both base chains: `raw` (-300), before conntrack (-200).
pub const RAW_PRIORITY: i32 = -300;

/// Netfilter hooks ctguard's base chains attach to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// NF_INET_PRE_ROUTING.
    Prerouting,
    /// NF_INET_LOCAL_OUT.
    Output,
}

impl Hook {
    /// nft keyword.
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Prerouting => "prerouting",
            Hook::Output => "output",
        }
    }
}

/// Element type of a named set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetKind {
    /// `inet_service` with `flags interval` (ports and ranges).
    Ports,
    /// `ipv4_addr` with `flags interval` (prefixes).
    Ipv4,
    /// `ipv6_addr` with `flags interval` (prefixes).
    Ipv6,
    /// `ifname` (exact names, no interval).
    Ifname,
}

impl SetKind {
    /// nft type keyword.
    pub fn type_name(self) -> &'static str {
        match self {
            SetKind::Ports => "inet_service",
            SetKind::Ipv4 => "ipv4_addr",
            SetKind::Ipv6 => "ipv6_addr",
            SetKind::Ifname => "ifname",
        }
    }
    /// True for sets declared with `flags interval`.
    pub fn is_interval(self) -> bool {
        !matches!(self, SetKind::Ifname)
    }
}

/// A set element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Elem {
    /// A port or port range.
    Port(PortRange),
    /// An address prefix.
    Prefix(Prefix),
    /// An interface name.
    Ifname(IfName),
}

/// A named set in ctguard's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetIr {
    /// `[a-z][a-z0-9_]*`, unique in the table.
    pub name: String,
    /// Element type.
    pub kind: SetKind,
    /// Non-empty, sorted, no overlaps.
    pub elements: Vec<Elem>,
}

/// One match of a rule, in the order nft prints them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// `iifname @set`.
    IifnameInSet(String),
    /// `oifname @set`.
    OifnameInSet(String),
    /// `oifname "NAME"`.
    OifnameIs(IfName),
    /// `ip saddr @set` / `ip6 saddr @set` (`v6` picks the family).
    SaddrInSet {
        /// IPv6 when true.
        v6: bool,
        /// Set name.
        set: String,
    },
    /// `ip daddr @set` / `ip6 daddr @set`.
    DaddrInSet {
        /// IPv6 when true.
        v6: bool,
        /// Set name.
        set: String,
    },
    /// `udp dport @set` / `tcp dport @set`.
    DportInSet {
        /// Transport protocol.
        proto: Proto,
        /// Set name.
        set: String,
    },
    /// `udp sport @set` / `tcp sport @set`.
    SportInSet {
        /// Transport protocol.
        proto: Proto,
        /// Set name.
        set: String,
    },
    /// `fib daddr type local`.
    FibDaddrLocal,
}

/// A NOTRACK rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleIr {
    /// Matches, all must hold.
    pub matches: Vec<Match>,
    /// The rule's comment: the transaction tag.
    pub comment: String,
}

/// A base chain at raw priority with policy accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainIr {
    /// Chain name (equal to the hook name).
    pub name: String,
    /// The hook.
    pub hook: Hook,
    /// Always [`RAW_PRIORITY`].
    pub priority: i32,
    /// Rules in order; every one ends in `notrack`.
    pub rules: Vec<RuleIr>,
}

/// `table inet ctguard` as ctguard wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableIr {
    /// Always [`TABLE_NAME`].
    pub name: String,
    /// Named sets, declared before the chains that use them.
    pub sets: Vec<SetIr>,
    /// `prerouting` then `output`.
    pub chains: Vec<ChainIr>,
}

impl TableIr {
    /// True when the policy has no NOTRACK entries: no table is created.
    pub fn is_empty(&self) -> bool {
        self.sets.is_empty() && self.chains.iter().all(|c| c.rules.is_empty())
    }
}

/// Builds the table for `policy`; every rule carries `tag` as its comment.
///
/// Per entry `i`: sets `ports_i`, `src4_i`, `src6_i`, `ifaces_i` (those needed). Prerouting:
/// `[iifname @ifaces_i] [ip|ip6 saddr @src] PROTO dport @ports_i [fib daddr type local] notrack`.
/// Output: `[oifname @ifaces_i] [ip|ip6 daddr @src] PROTO sport @ports_i notrack`, and when
/// loopback is covered `oifname "lo" [ip|ip6 saddr @src] PROTO dport @ports_i notrack` (local
/// queries are classified at output before prerouting sees them, DESIGN §6).
pub fn table_for(policy: &Policy, tag: &Tag) -> TableIr {
    let mut sets = Vec::new();
    let mut pre = Vec::new();
    let mut out = Vec::new();
    for (i, n) in policy.notrack.iter().enumerate() {
        entry_rules(i, n, tag, &mut sets, &mut pre, &mut out);
    }
    let chain = |hook: Hook, rules| ChainIr { name: hook.as_str().into(), hook, priority: RAW_PRIORITY, rules };
    TableIr { name: TABLE_NAME.into(), sets, chains: vec![chain(Hook::Prerouting, pre), chain(Hook::Output, out)] }
}

fn entry_rules(
    i: usize,
    n: &NotrackRule,
    tag: &Tag,
    sets: &mut Vec<SetIr>,
    pre: &mut Vec<RuleIr>,
    out: &mut Vec<RuleIr>,
) {
    let ports = format!("ports_{i}");
    sets.push(SetIr {
        name: ports.clone(),
        kind: SetKind::Ports,
        elements: n.ports.iter().copied().map(Elem::Port).collect(),
    });
    // Address families: None = any source; Some(v6) = restricted to that family's set.
    let mut families: Vec<Option<(bool, String)>> = Vec::new();
    if n.sources.is_empty() {
        families.push(None);
    }
    for (v6, kind, name) in [(false, SetKind::Ipv4, format!("src4_{i}")), (true, SetKind::Ipv6, format!("src6_{i}"))] {
        let elements: Vec<Elem> = n.sources.iter().filter(|p| p.is_v6() == v6).copied().map(Elem::Prefix).collect();
        if !elements.is_empty() {
            sets.push(SetIr { name: name.clone(), kind, elements });
            families.push(Some((v6, name)));
        }
    }
    let ifaces = (!n.interfaces.is_empty()).then(|| {
        let name = format!("ifaces_{i}");
        sets.push(SetIr {
            name: name.clone(),
            kind: SetKind::Ifname,
            elements: n.interfaces.iter().cloned().map(Elem::Ifname).collect(),
        });
        name
    });
    let rule = |matches| RuleIr { matches, comment: tag.as_str().to_string() };
    if n.queries() {
        querying_rules(i, n, &ports, ifaces.as_deref(), &rule, sets, pre, out);
    }
    if !n.serves() {
        return;
    }
    for fam in &families {
        for &proto in &n.protocols {
            let mut m = Vec::new();
            if let Some(s) = &ifaces {
                m.push(Match::IifnameInSet(s.clone()));
            }
            if let Some((v6, set)) = fam {
                m.push(Match::SaddrInSet { v6: *v6, set: set.clone() });
            }
            m.push(Match::DportInSet { proto, set: ports.clone() });
            if n.local_only {
                m.push(Match::FibDaddrLocal);
            }
            pre.push(rule(m));

            let mut m = Vec::new();
            if let Some(s) = &ifaces {
                m.push(Match::OifnameInSet(s.clone()));
            }
            if let Some((v6, set)) = fam {
                m.push(Match::DaddrInSet { v6: *v6, set: set.clone() });
            }
            m.push(Match::SportInSet { proto, set: ports.clone() });
            out.push(rule(m));

            if n.covers_loopback() {
                let mut m = vec![Match::OifnameIs(loopback())];
                if let Some((v6, set)) = fam {
                    m.push(Match::SaddrInSet { v6: *v6, set: set.clone() });
                }
                m.push(Match::DportInSet { proto, set: ports.clone() });
                out.push(rule(m));
            }
        }
    }
}

/// This host's own queries to upstreams (side `querying`/`both`): output
/// `[oifname @ifaces_i] ip|ip6 daddr @up4_i|@up6_i PROTO dport @ports_i notrack`, prerouting
/// `[iifname @ifaces_i] ip|ip6 saddr @up… PROTO sport @ports_i fib daddr type local notrack`
/// (the answers, to this host only). Always restricted to the upstream prefixes.
#[allow(clippy::too_many_arguments)]
fn querying_rules(
    i: usize,
    n: &NotrackRule,
    ports: &str,
    ifaces: Option<&str>,
    rule: &dyn Fn(Vec<Match>) -> RuleIr,
    sets: &mut Vec<SetIr>,
    pre: &mut Vec<RuleIr>,
    out: &mut Vec<RuleIr>,
) {
    for (v6, kind, name) in [(false, SetKind::Ipv4, format!("up4_{i}")), (true, SetKind::Ipv6, format!("up6_{i}"))] {
        let elements: Vec<Elem> = n.upstreams.iter().filter(|p| p.is_v6() == v6).copied().map(Elem::Prefix).collect();
        if elements.is_empty() {
            continue;
        }
        sets.push(SetIr { name: name.clone(), kind, elements });
        for &proto in &n.protocols {
            let mut m = Vec::new();
            if let Some(s) = ifaces {
                m.push(Match::OifnameInSet(s.to_string()));
            }
            m.push(Match::DaddrInSet { v6, set: name.clone() });
            m.push(Match::DportInSet { proto, set: ports.to_string() });
            out.push(rule(m));

            let mut m = Vec::new();
            if let Some(s) = ifaces {
                m.push(Match::IifnameInSet(s.to_string()));
            }
            m.push(Match::SaddrInSet { v6, set: name.clone() });
            m.push(Match::SportInSet { proto, set: ports.to_string() });
            m.push(Match::FibDaddrLocal);
            pre.push(rule(m));
        }
    }
}

fn loopback() -> IfName {
    match IfName::parse("lo") {
        Ok(n) => n,
        Err(e) => unreachable!("\"lo\" is a valid interface name: {e}"),
    }
}
